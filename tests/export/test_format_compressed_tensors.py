"""compressed-tensors pack-quantized: exact round trips, the library's own packer and decompressor agree
bit for bit, transformers' integration runs it with lowbit's logits, mixed precision survives."""

import json

import pytest
import torch
from safetensors.torch import load_file

from export_helpers import assert_same_records, compare_logits
from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct, read

pytest.importorskip("compressed_tensors")


def _scheme(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


@pytest.mark.parametrize("bits,sym,gs", [(2, False, 64), (3, True, 32), (4, True, 64), (4, False, 64),
                                         (5, False, 0), (8, True, 128)])
def test_library_packs_and_decompresses_exactly_as_written(qm_factory, tmp_path, bits, sym, gs):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as P

    qm, _ = qm_factory(bits=bits, symmetric=sym, group_size=gs)
    ct.write(qm, tmp_path / "q")
    files = load_file(str(tmp_path / "q" / "model.safetensors"))
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    args = groups["group_0"]["weights"]
    off = 2 ** (bits - 1)
    for name, qw in qm.layers.items():
        mine = {k.removeprefix(name + "."): v for k, v in files.items() if k.startswith(name + ".weight_")}
        w = qw.dequantize()
        state = {"weight": w, "weight_scale": mine["weight_scale"]}
        if not sym:
            zp = qw.zero.expand_as(mine["weight_scale"]).to(torch.int64) - off
            state["weight_zero_point"] = zp.to(torch.int8)
        theirs = P.compress(state, _scheme(args))  # the library's own quantize + pack of the same weights
        assert torch.equal(theirs["weight_packed"], mine["weight_packed"]), name
        if not sym:
            assert torch.equal(theirs["weight_zero_point"], mine["weight_zero_point"]), name
        back = P.decompress(dict(mine), _scheme(args))["weight"]  # the library's decompressor
        assert back.dtype == torch.float16 and torch.equal(back, w.to(torch.float16)), name
    assert_same_records(qm, read(tmp_path / "q"))


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_runs_the_export_with_lowbits_logits(qm_factory, tmp_path, sym):
    import transformers

    qm, model = qm_factory(bits=4, symmetric=sym, group_size=64)
    ct.write(qm, tmp_path / "q")
    # transformers 5.23 builds asymmetric packed layers with unpacked zero-point shapes; its
    # dequantize-at-load route takes the library's packed zero points
    kw = {} if sym else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32, **kw)
    worst, top1 = compare_logits(model, theirs, qm.tokenizer)
    print(f"compressed-tensors sym={sym}: max |dlogit| {worst:.2e}, top-1 {top1:.3f}")
    assert top1 == 1.0 and worst < 2e-2  # weights dequantized in fp16 by the library


def test_mixed_precision_keeps_one_config_group_per_spec(qm_factory, tmp_path):
    import transformers

    qm, _ = qm_factory(bits=4, group_size=64)
    qm8, _ = qm_factory(bits=8, group_size=0)
    name = "model.layers.1.mlp.down_proj"
    qm.layers[name] = qm8.layers[name]
    ct.write(qm, tmp_path / "q")
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2 and groups["group_1"]["targets"] == [name]
    assert groups["group_1"]["weights"]["num_bits"] == 8 and groups["group_1"]["weights"]["strategy"] == "channel"
    back = read(tmp_path / "q")
    assert back.layers[name].spec.bits == 8 and back.layers["model.layers.0.mlp.down_proj"].spec.bits == 4
    assert_same_records(qm, back)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    worst, top1 = compare_logits(qm.to_module(), theirs, qm.tokenizer)
    assert top1 == 1.0 and worst < 2e-2
    # the compressed route decompresses in the model's dtype: exactly the record's weights
    assert torch.equal(theirs.get_submodule(name).weight, qm.layers[name].dequantize())


def test_codebook_formats_are_refused_before_writing(qm_factory, tmp_path):
    qm, _ = qm_factory(dtype="nf4", group_size=64)
    with pytest.raises(LowbitError, match="model.layers.0.self_attn.q_proj: the compressed-tensors format cannot "
                                          "hold this layer: it is nf4"):
        ct.write(qm, tmp_path / "q")
    assert not (tmp_path / "q").exists()
