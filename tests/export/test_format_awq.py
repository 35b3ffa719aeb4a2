"""AWQ GEMM layout: AutoAWQ's interleaved nibble order, exact round trips, refusals before writing."""

import json

import pytest
import torch

from export_helpers import assert_same_records
from lowbit.errors import LowbitError
from lowbit.export import awq, read


def test_packing_follows_autoawqs_reference_loop():
    u = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = torch.zeros(3, 2, dtype=torch.int64)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear
    for col in range(2):
        for i in range(8):
            ref[:, col] |= u[:, col * 8 + order_map[i]] << (i * 4)
    assert torch.equal(awq.pack_awq(u).to(torch.int64) & 0xFFFFFFFF, ref)
    assert torch.equal(awq.unpack_awq(awq.pack_awq(u)), u.to(torch.int16))


@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_is_exact(qm_factory, tmp_path, sym):
    qm, _ = qm_factory(bits=4, symmetric=sym, group_size=32)
    awq.write(qm, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": ["lm_head"]}
    back = read(tmp_path / "q")
    assert_same_records(qm, back)
    assert all(qw.spec.symmetric == sym for qw in back.layers.values())


@pytest.mark.parametrize("spec,match", [(dict(bits=3, group_size=64), "3-bit codes; the format holds 4 bits"),
                                        (dict(bits=4, group_size=0), "per channel; AWQ GEMM stores groups")])
def test_what_awq_cannot_hold_fails_before_writing(qm_factory, tmp_path, spec, match):
    qm, _ = qm_factory(**spec)
    with pytest.raises(LowbitError, match="model.layers.0.self_attn.q_proj: the awq format cannot hold this "
                                          "layer: .*" + match):
        awq.write(qm, tmp_path / "q")
    assert not (tmp_path / "q").exists()
