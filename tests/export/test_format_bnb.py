"""bitsandbytes NF4: bitsandbytes' own dequantize_4bit and transformers' integration reproduce the records,
with and without double quantization; lowbit reads what transformers + bitsandbytes save."""

import json

import pytest
import torch
from safetensors.torch import load_file

from export_helpers import assert_same_records, compare_logits
from lowbit.errors import LowbitError
from lowbit.export import bnb, read

pytest.importorskip("bitsandbytes")


def _quant_state(files, name):
    from bitsandbytes.functional import QuantState

    qs = {k.removeprefix(name + ".weight."): v for k, v in files.items() if k.startswith(name + ".weight.")}
    return QuantState.from_dict(qs, device=torch.device("cpu"))


def test_dynamic_map_is_bitsandbytes():
    from bitsandbytes.functional import create_dynamic_map

    assert torch.equal(bnb.dynamic_map(), create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_dequantizes_the_export_exactly(qm_factory, tmp_path, double_quant):
    from bitsandbytes.functional import dequantize_4bit

    qm, _ = qm_factory(dtype="nf4", group_size=64)
    if double_quant:
        qm = bnb.double_quantize(qm)
    bnb.write(qm, tmp_path / "q", double_quant=double_quant)
    files = load_file(str(tmp_path / "q" / "model.safetensors"))
    for name, qw in qm.layers.items():
        theirs = dequantize_4bit(files[f"{name}.weight"], _quant_state(files, name))
        assert torch.equal(theirs, qw.dequantize()), name  # float32 state: bit-exact
    back = read(tmp_path / "q")
    assert_same_records(qm, back)
    if double_quant:  # re-exporting a double-quantized checkpoint keeps its grid
        bnb.write(back, tmp_path / "again", double_quant=True)
        a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("q", "again"))
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_double_quantize_costs_little(qm_factory):
    qm, _ = qm_factory(dtype="nf4", group_size=64)
    dq = bnb.double_quantize(qm)
    for name, qw in qm.layers.items():
        w, v = qw.dequantize(), dq.layers[name].dequantize()
        assert float((w - v).norm() / w.norm()) < 0.05, name  # NF4 error itself is ~0.1


@pytest.mark.parametrize("double_quant", [False, True])
def test_transformers_runs_the_export_with_lowbits_logits(qm_factory, tmp_path, double_quant):
    import transformers

    qm, _ = qm_factory(dtype="nf4", group_size=64)
    if double_quant:
        qm = bnb.double_quantize(qm)
    bnb.write(qm, tmp_path / "q", double_quant=double_quant)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    worst, top1 = compare_logits(qm.to_module(), theirs, qm.tokenizer)
    print(f"bnb-nf4 double_quant={double_quant}: max |dlogit| {worst:.2e}, top-1 {top1:.3f}")
    assert top1 == 1.0 and worst < 2e-2  # both sides run NF4 matmuls in bf16 on the CPU (weights are exact)


def test_lowbit_reads_what_transformers_and_bitsandbytes_save(tiny_dir, tmp_path):
    import transformers

    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg,
                                                               dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "bnb")
    qm = read(tmp_path / "bnb")
    assert len(qm.layers) == 14 and all(qw.spec.dtype == "nf4" for qw in qm.layers.values())
    for name, qw in qm.layers.items():
        w = theirs.get_submodule(name).weight
        from bitsandbytes.functional import dequantize_4bit

        assert torch.equal(qw.dequantize(), dequantize_4bit(w.data, w.quant_state)), name
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)  # save_pretrained of a model writes none
    worst, top1 = compare_logits(qm.to_module(), theirs, tok)
    assert top1 == 1.0 and worst < 2e-2


@pytest.mark.parametrize("spec,match", [(dict(dtype="nf4", group_size=32), "NF4 g32; bitsandbytes quantizes "
                                                                         "blocks of 64"),
                                        (dict(dtype="fp4", group_size=64), "FP4 g64; the format stores NF4"),
                                        (dict(bits=4, group_size=64), "int4 sym g64; the format stores NF4")])
def test_what_bnb_cannot_hold_fails_before_writing(qm_factory, tmp_path, spec, match):
    qm, _ = qm_factory(**spec)
    with pytest.raises(LowbitError, match="model.layers.0.self_attn.q_proj: the bnb-nf4 format cannot hold this "
                                          "layer: it is " + match):
        bnb.write(qm, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_double_quant_of_records_off_its_grid_is_refused(qm_factory, tmp_path):
    qm, _ = qm_factory(dtype="nf4", group_size=64)
    with pytest.raises(LowbitError, match="double-quantization grid; pass the model through"):
        bnb.write(qm, tmp_path / "q", double_quant=True)
    assert not (tmp_path / "q").exists()
    cfg = json.loads((bnb.write(qm, tmp_path / "q") / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_use_double_quant"] is False and cfg["llm_int8_skip_modules"] == ["lm_head"]
