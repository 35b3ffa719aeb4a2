"""RTN through the block pipeline, save/load round trip, and the CLI, on a tiny random Llama."""

import json
import subprocess
import sys

import pytest
import torch

from lowbit.methods import get_method
from lowbit.methods.base import Method
from lowbit.api import quantize_to as quantize
from lowbit.errors import LowbitError
from lowbit.export.lowbit import load as load_checkpoint, read_manifest
from lowbit.models import load_model
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe, load_recipe
from lowbit.spec import QuantSpec, preset

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rtn_swaps_every_block_linear_and_matches_dequantized_weights(tiny_dir):
    model, _ = load_model(tiny_dir)
    ref, _ = load_model(tiny_dir)
    qweights = quantize_model(model, Recipe(preset("W4G64")), get_method("rtn"), progress=False)
    assert len(qweights) == 2 * 7
    qlinears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(qlinears) == sorted(qweights)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    # same network with dense dequantized weights gives the same logits (bf16 kernels: loose tolerance)
    for name, qw in qweights.items():
        ref.get_submodule(name).weight.data = qw.dequantize()
    a, b = logits(model), logits(ref)
    assert (a - b).abs().max() / b.abs().max() < 0.02


def test_save_load_identical_outputs_and_manifest(tiny_dir, tmp_path):
    model, tok = quantize(str(tiny_dir), tmp_path / "q", Recipe(preset("W3G64")), progress=False)
    reloaded, tok2 = load_checkpoint(tmp_path / "q")
    assert torch.equal(logits(model), logits(reloaded))
    m = read_manifest(tmp_path / "q")
    assert m["method"] == "rtn" and m["source"] == str(tiny_dir) and m["lowbit_version"]
    layer = m["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["spec"]["bits"] == 3 and layer["shape"] == [128, 128]
    assert 3.0 < layer["bits_per_weight"] < 4.5
    assert tok2 is not None


def test_quantized_head_unties_embeddings(tiny_dir):
    model, _ = load_model(tiny_dir)
    emb = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, Recipe(preset("W8"), quantize_head=True), get_method("rtn"), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert model.config.tie_word_embeddings is False


def test_recipe_overrides_and_ignore(tiny_dir, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("method: rtn\nbits: 4\ngroup_size: 32\nsymmetric: false\n"
                 "ignore: ['layers\\.1\\.mlp\\.down_proj']\n"
                 "overrides:\n  - pattern: 'mlp\\.down_proj'\n    bits: 8\n    granularity: channel\n    symmetric: true\n")
    recipe = load_recipe(r)
    model, _ = load_model(tiny_dir)
    plan = recipe.plan(model, __import__("lowbit.models", fromlist=["arch_for"]).arch_for(model))
    assert "model.layers.1.mlp.down_proj" not in plan
    assert plan["model.layers.0.mlp.down_proj"] == QuantSpec(bits=8, granularity="channel")
    assert plan["model.layers.0.self_attn.q_proj"] == QuantSpec(bits=4, symmetric=False, group_size=32)


def test_cli_quantize_inspect_eval_json(tiny_dir, tmp_path):
    out = tmp_path / "cli-q"
    run = lambda *a: subprocess.run([sys.executable, "-c", "from lowbit.cli import main; main()", *map(str, a)],
                                    capture_output=True, text=True)
    r = run("quantize", tiny_dir, "-o", out, "--bits", "4", "--group-size", "32", "--asym")
    assert r.returncode == 0, r.stderr
    r = run("inspect", out)
    assert r.returncode == 0 and "int4 asym g32" in r.stdout and "14 layers" in r.stdout
    r = run("eval", tiny_dir, out, "--json", "--windows", "2", "--seq-len", "64", "--no-speed")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for side in ("original", "quantized"):
        for key in ("perplexity", "kl", "top1_agreement", "bits_per_weight", "size_bytes",
                    "decode_tokens_per_s", "prefill_tokens_per_s"):
            assert key in res[side]
    assert res["original"]["kl"] == 0 and res["quantized"]["kl"] > 0
    assert res["original"]["bits_per_weight"] == 32 and 4.5 < res["quantized"]["bits_per_weight"] < 8
    assert res["quantized"]["size_bytes"] < res["original"]["size_bytes"]


class _Recorder:
    def __init__(self):
        self.xs = []

    def add(self, x):
        self.xs.append(x.detach().clone())


class RecordingRTN(Method):
    """RTN that asks for calibration and records what every Linear saw."""

    name = "recording"
    needs_calibration = True

    def __init__(self):
        super().__init__()
        self.seen = {}

    def make_stats(self, name, linear):
        self.seen[name] = _Recorder()
        return self.seen[name]

    def prepare_block(self, block, run_block, arch, plan, search=None):
        return False

    def quantize_linear(self, name, W, spec, stats):
        from lowbit.core.quantize import quantize

        return quantize(W, spec)


def test_calibration_is_block_and_group_sequential(tiny_dir):
    """Each Linear's calibration inputs equal its inputs in the final quantized model."""
    model, _ = load_model(tiny_dir)
    ids = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(1))
    method = RecordingRTN()
    # in the model's own dtype, so the inputs must match exactly (bf16 calibration only adds rounding)
    quantize_model(model, Recipe(preset("W2G64")), method, calib_ids=ids, progress=False, swap=False, calib_dtype=None)
    final = {}

    def keep(name):
        def hook(_m, args, _out):
            final[name] = args[0].clone()

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in method.seen]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.0.mlp.gate_proj"):
        seen = torch.cat(method.seen[name].xs)
        assert seen.shape[0] == 3 and torch.allclose(seen, final[name], atol=1e-5), name
    # and the calibrated path quantizes exactly like the plain RTN path
    plain, _ = load_model(tiny_dir)
    quantize_model(plain, Recipe(preset("W2G64")), get_method("rtn"), progress=False, swap=False)
    assert torch.equal(plain.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_gptq_checkpoint_reports_layer_error_beside_floor(tiny_dir, tmp_path):
    recipe = Recipe(QuantSpec(bits=3, group_size=64, symmetric=False), method="gptq", options={"act_order": False})
    quantize(str(tiny_dir), tmp_path / "g", recipe, n_samples=4, seq_len=64, progress=False)
    layers = read_manifest(tmp_path / "g")["layers"]
    assert len(layers) == 14
    for info in layers.values():
        assert info["error_floor"] == pytest.approx(4.0 ** -3, rel=1e-4)
        assert 0 < info["rel_error"] < 1
    r = subprocess.run([sys.executable, "-c", "from lowbit.cli import main; main()", "inspect", str(tmp_path / "g")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "rel.err  floor" in r.stdout and "0.0156" in r.stdout


def test_interrupted_gptq_run_resumes_bit_identically(tiny_dir, tmp_path):
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(2))
    recipe = Recipe(QuantSpec(bits=3, group_size=64), method="gptq")

    def run(state_dir, fail_at=None):
        model, _ = load_model(tiny_dir)
        method = get_method("gptq")
        if fail_at is not None:
            inner = method.quantize_group

            def quantize_group(names, *args):
                if names[0].startswith(f"model.layers.{fail_at}."):
                    raise KeyboardInterrupt
                return inner(names, *args)

            method.quantize_group = quantize_group
        return quantize_model(model, recipe, method, ids, progress=False, swap=False, state_dir=state_dir)

    reference = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "state", fail_at=1)
    assert (tmp_path / "state" / "calibration_state.safetensors").is_file()
    # one file per finished block, written once, holding that block's layers only
    assert sorted(p.name for p in (tmp_path / "state").glob("block_*")) == ["block_0000.safetensors"]
    from safetensors.torch import load_file

    first = {k.rsplit(".", 1)[0] for k in load_file(tmp_path / "state" / "block_0000.safetensors")}
    assert len(first) == 7 and all(n.startswith("model.layers.0.") for n in first)
    resumed = run(tmp_path / "state")
    assert sorted(resumed) == sorted(reference)
    for name, qw in reference.items():
        assert torch.equal(qw.codes, resumed[name].codes) and torch.equal(qw.scale, resumed[name].scale), name
    assert sorted(p.name for p in (tmp_path / "state").glob("block_*")) == ["block_0000.safetensors",
                                                                             "block_0001.safetensors"]
    again = run(tmp_path / "state")  # everything finished: the state alone gives the same layers
    assert all(torch.equal(qw.codes, again[name].codes) for name, qw in reference.items())
    (tmp_path / "state" / "block_0000.safetensors").unlink()
    with pytest.raises(LowbitError, match="block_0000.safetensors is missing"):
        run(tmp_path / "state")
    with pytest.raises(LowbitError, match="different model, recipe or calibration"):
        run_other = Recipe(QuantSpec(bits=4, group_size=64), method="gptq")
        model, _ = load_model(tiny_dir)
        quantize_model(model, run_other, get_method("gptq"), ids, progress=False, swap=False,
                       state_dir=tmp_path / "state")
