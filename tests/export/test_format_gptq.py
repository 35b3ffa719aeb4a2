"""GPTQ layout: exact round trips at 2/3/4/8 bits, v1's zero-point convention, refusals before writing."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.export import gptq, read

from export_helpers import assert_same_records


@pytest.mark.parametrize("bits,sym,gs", [(2, False, 64), (3, True, 64), (3, False, 32), (4, True, 64),
                                         (4, False, 0), (8, True, 128)])
def test_round_trip_is_exact(qm_factory, tmp_path, bits, sym, gs):
    qm, _ = qm_factory(bits=bits, symmetric=sym, group_size=gs)
    gptq.write(qm, tmp_path / "q", checkpoint_format="gptq_v2" if not sym and bits == 2 else "gptq")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == bits and cfg["sym"] == sym and cfg["group_size"] == (gs or -1)
    back = read(tmp_path / "q")
    assert_same_records(qm, back)
    for name, qw in back.layers.items():
        assert qw.spec.bits == bits and qw.spec.symmetric == sym, name


def test_layout_matches_the_reference_packing(qm_factory, tmp_path):
    """qweight bits are the codes along the input dim, qzeros hold z - 1 in v1 (AutoGPTQ's pack loop)."""
    qm, _ = qm_factory(bits=4, symmetric=True, group_size=64)
    name = "model.layers.0.self_attn.q_proj"
    qw = qm.layers[name]
    t = gptq.layer_tensors(name, qw)
    u = (qw.codes.to(torch.int64) + 8).t()  # [in, out]
    ref = torch.zeros(u.shape[0] // 8, u.shape[1], dtype=torch.int64)
    for j in range(8):
        ref |= u[j::8] << (4 * j)
    assert torch.equal(t[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF, ref)
    assert (t[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF).unique().tolist() == [0x77777777]
    assert t[f"{name}.scales"].shape == (2, 128) and t[f"{name}.g_idx"].tolist() == [i // 64 for i in range(128)]


def test_three_bit_codes_cross_words_like_autogptq():
    from lowbit.core.packing import pack_bits

    codes = torch.randint(0, 8, (1, 32), generator=torch.Generator().manual_seed(1))
    words = pack_bits(codes, 3, torch.int32).to(torch.int64) & 0xFFFFFFFF
    c = codes[0].tolist()
    w0 = sum(c[j] << (3 * j) for j in range(10)) | ((c[10] << 30) & 0xFFFFFFFF)
    w1 = (c[10] >> 2) & 1 | sum(c[11 + j] << (3 * j + 1) for j in range(10)) | ((c[21] << 31) & 0xFFFFFFFF)
    w2 = (c[21] >> 1) & 3 | sum(c[22 + j] << (3 * j + 2) for j in range(10))
    assert words[0].tolist() == [w0, w1, w2]


def test_v1_refuses_a_zero_point_of_zero_before_writing(qm_factory, tmp_path):
    qm, _ = qm_factory(bits=4, symmetric=False, group_size=64)
    name = "model.layers.1.mlp.down_proj"
    qw = qm.layers[name]
    qw.zero[0, 0] = 0
    qm.layers[name] = qw
    with pytest.raises(LowbitError, match=f"{name}: .*zero point of 0.*gptq_v2"):
        gptq.write(qm, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    gptq.write(qm, tmp_path / "q", checkpoint_format="gptq_v2")
    assert_same_records(qm, read(tmp_path / "q"))


@pytest.mark.parametrize("spec,match", [(dict(dtype="nf4"), "nf4; the format stores integer codes"),
                                        (dict(bits=5), "5-bit codes; the format holds 2/3/4/8 bits"),
                                        (dict(bits=4, quantize_head=True), "lm_head: .*decoder-block Linears")])
def test_specs_it_cannot_hold_fail_before_writing(qm_factory, tmp_path, spec, match):
    qm, _ = qm_factory(**{"group_size": 64, **spec})
    with pytest.raises(LowbitError, match=match):
        gptq.write(qm, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_mixed_bit_widths_are_refused_naming_the_layer(qm_factory, tmp_path):
    qm, _ = qm_factory(bits=4, group_size=64)
    qm8, _ = qm_factory(bits=8, group_size=64)
    name = "model.layers.1.mlp.up_proj"
    qm.layers[name] = qm8.layers[name]
    with pytest.raises(LowbitError, match=f"{name}: int8 sym g64 differs"):
        gptq.write(qm, tmp_path / "q")


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors", "bnb-nf4"])
def test_eval_inspect_generate_load_every_format(qm_factory, tmp_path, fmt):
    """load_model (behind lowbit eval / inspect / generate) dispatches on quantization_config."""
    from lowbit.export import detect_format, write
    from lowbit.models import load_model

    qm, _ = qm_factory(**({"dtype": "nf4"} if fmt == "bnb-nf4" else {"bits": 4}), group_size=64)
    write(qm, tmp_path / "q", fmt)
    assert detect_format(tmp_path / "q") == fmt
    model, tok = load_model(str(tmp_path / "q"))
    ids = tok("hello world, once more", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qm.to_module()(ids).logits)
