"""`lowbit quantize MODEL --scheme ...` on a tiny random Llama: saved, loaded back identical, bad
input is one error line naming the module or parameter with nothing written."""

import json

import pytest
import torch

from lowbit.nn.int8_linear import Int8Linear


@pytest.mark.parametrize("args", [["--scheme", "w8a8-dynamic"],
                                  ["--scheme", "w8a8-static", "--observer", "percentile", "--smoothquant", "0.5"],
                                  ["--scheme", "w8a8-static", "--smoothquant", "auto"],
                                  ["--scheme", "w8a8-static", "--smoothquant", "qkv=0.8,o=0.5,gate_up=0.8,down=auto"],
                                  ["--scheme", "w4a8"]])
def test_quantize_save_load(lowbit_cli, tiny_dir, tmp_path, args):
    import lowbit

    out = tmp_path / "q"
    r = lowbit_cli("quantize", str(tiny_dir), "-o", str(out), "--samples", "2", "--seq-len", "32", *args)
    assert r.code == 0, r.err[-2000:]
    manifest = json.loads((out / "lowbit.json").read_text())
    assert len(manifest["schemes"]) == 14 and len(manifest["layers"]) == 14
    model, _ = lowbit.load(out)
    lin = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(lin) == 14
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        logits = model(ids).logits
        again = lowbit.load(out)[0](ids).logits
    assert torch.isfinite(logits).all() and torch.equal(logits, again)


@pytest.mark.parametrize("args, needle", [
    (["--scheme", "w9a9"], "unknown scheme 'w9a9'"),
    (["--scheme", "w8a8-dynamic", "--observer", "mse"], "applies to static schemes"),
    (["--scheme", "w8a8-static", "--observer", "median"], "observer='median' is unknown"),
    (["--scheme", "w8a8-static", "--smoothquant", "1.5"], "alpha=1.5"),
    (["--scheme", "w8a8-static", "--smoothquant", "strong"], "--smoothquant 'strong'"),
    (["--scheme", "w8a8-static", "--smoothquant", "qkv=0.8,ffn=0.5"], "unknown mapping 'ffn'"),
    (["--observer", "mse"], "go with --scheme"),
    (["--scheme", "w8a8-static", "--format", "gguf"], "--scheme writes lowbit checkpoints"),
])
def test_bad_arguments(lowbit_cli, tiny_dir, tmp_path, args, needle):
    out = tmp_path / "q"
    lowbit_cli("quantize", str(tiny_dir), "-o", str(out), *args).assert_error(needle)
    assert not out.exists()


def test_nan_weights_name_the_module(lowbit_cli, tiny_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    f = tiny_copy / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    out = tmp_path / "q"
    lowbit_cli("quantize", str(tiny_copy), "-o", str(out), "--scheme", "w8a8-dynamic").assert_error("up_proj")
    assert not out.exists()


def test_smoothing_keeps_the_function(tiny_dir):
    from lowbit.models import load_model
    from lowbit.ptq.smoothquant import smooth

    model, _ = load_model(str(tiny_dir))
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        s = smooth(model, [ids], 0.5)
        got = model(ids).logits
    assert len(s) == 6  # 2 blocks x (input norm, post-attention norm, up -> down)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
