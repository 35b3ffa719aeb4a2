"""A mixed-precision plan exported: compressed-tensors with one config group per option, loaded
by transformers' compressed-tensors integration with lowbit's logits; GGUF with one type per
tensor (the options that are llama.cpp types: Q4_0, Q5_0, Q8_0), read back bit for bit."""

import json
from collections import Counter

import pytest
import torch

from export_helpers import assert_same_records, compare_logits
from lowbit.export import QuantizedModel, read


def _mixed_qm(tiny_dir, tmp_path, bits, groups, target, symmetric=None):
    from lowbit.methods import get_method
    from lowbit.mixed.allocate import allocate, measurement_layers
    from lowbit.mixed.apply import plan_recipe
    from lowbit.mixed.measure import measure
    from lowbit.mixed.options import candidate_options
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model

    model, tok = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 49152, (4, 64), generator=g)
    sens = torch.randint(0, 49152, (2, 32), generator=g)
    meas = measure(model, calib, sens, options=candidate_options(bits=bits, groups=groups, symmetric=symmetric),
                   path=tmp_path / "m.json", progress=False)
    plan = allocate(measurement_layers(meas), target)
    model, tok = load_model(str(tiny_dir))
    records = quantize_model(model, plan_recipe(plan, meas), get_method("gptq"), calib, progress=False)
    return QuantizedModel.from_model(model, tok, records, method="gptq"), model, plan, meas


def test_compressed_tensors_mixed_plan_runs_in_transformers(tiny_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    from lowbit.export import compressed_tensors as ct

    # symmetric options: transformers 5.23 runs packed asymmetric layers only through its
    # dequantize-at-load route, which decompresses every dense layer with the FIRST config group's
    # scheme (integrations/compressed_tensors.get_dense_scheme), so a mixed asymmetric plan does
    # not load there; the compressed route takes each layer's own group
    qm, model, plan, meas = _mixed_qm(tiny_dir, tmp_path, (2, 3, 4, 8), (32, 0), 3.5, symmetric=True)
    used = Counter(plan.choices.values())
    assert len({meas.options[o].bits for o in used}) >= 2  # mixed bit widths
    ct.write(qm, tmp_path / "q")
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    groups = q["config_groups"]
    assert len(groups) == len(used)
    for g in groups.values():  # each group targets exactly the layers of one option
        opts = {plan.choices[t] for t in g["targets"]}
        assert len(opts) == 1
        spec = meas.options[opts.pop()]
        assert g["weights"]["num_bits"] == spec.bits and g["weights"]["symmetric"] == spec.symmetric
    assert_same_records(qm, read(tmp_path / "q"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    worst, top1 = compare_logits(qm.to_module(), theirs, qm.tokenizer)
    print(f"mixed compressed-tensors in transformers: max |dlogit| {worst:.2e}, top-1 {top1:.3f}")
    # the library decompresses in fp16 (max |dlogit| 5.9e-3 measured); a random tiny model's logits
    # hold near-ties, where that flips an argmax now and then
    assert worst < 2e-2 and top1 >= 0.9


def test_gguf_mixed_plan_per_tensor_types(tiny_dir, tmp_path):
    import gguf

    from lowbit.export import gguf as G

    qm, _, plan, meas = _mixed_qm(tiny_dir, tmp_path, (4, 5, 8), (32,), 5.5)
    assert len(set(plan.choices.values())) >= 2
    out = G.write(qm, tmp_path / "mixed.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    want = {"w4g32s": "Q4_0", "w5g32s": "Q5_0", "w8g32s": "Q8_0"}
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, opt in plan.choices.items():
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        assert types[f"blk.{i}.{short[rest]}.weight"] == want[opt], name
    back = G.read(out)
    for name, qw in qm.layers.items():
        b = back.layers[name]
        assert b.spec == qw.spec and torch.equal(b.codes, qw.codes) and torch.equal(b.scale, qw.scale), name
