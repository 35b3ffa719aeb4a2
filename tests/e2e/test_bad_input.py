"""Every kind of bad input gets one clear LowbitError (CLI: message, exit 2) and nothing written."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from lowbit.api import make_spec
from lowbit.api import quantize_to as quantize
from lowbit.calibration import calibration_batches, eval_windows, load_text
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec


def cli(*args):
    return subprocess.run([sys.executable, "-c", "from lowbit.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True)


def test_missing_path_cli(tmp_path):
    r = cli("quantize", tmp_path / "nope", "-o", tmp_path / "out")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_copy, tmp_path):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="truncated"):
        load_model(tiny_copy)
    r = cli("quantize", tiny_copy, "-o", tmp_path / "out")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_garbage_safetensors_header(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(LowbitError, match="model.safetensors"):
        load_model(tiny_copy)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(LowbitError, match="broken.gguf"):
        load_model(f)


def test_unknown_architecture(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="'gpt2' is not known.*llama"):
        load_model(tiny_copy)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits, tmp_path):
    with pytest.raises(LowbitError, match="outside 2..8"):
        make_spec(bits, 64, True)
    with pytest.raises(LowbitError, match="outside 2..8"):
        QuantSpec(bits=bits)
    r = cli("quantize", "default", "-o", tmp_path / "out", "--bits", bits)
    assert r.returncode == 2 and "outside 2..8" in r.stderr


def test_group_size_not_dividing_names_layer(tiny_copy, tmp_path):
    with pytest.raises(LowbitError, match=r"group_size=96 .* 128 of model.layers.0.self_attn.q_proj"):
        quantize(str(tiny_copy), tmp_path / "out", Recipe(QuantSpec(bits=4, group_size=96)))
    assert not (tmp_path / "out").exists()


def test_nan_weight_is_named(tiny_copy, tmp_path):
    f = tiny_copy / "model.safetensors"
    t = load_file(f)
    key = "model.layers.1.mlp.down_proj.weight"
    t[key][3, 5] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="model.layers.1.mlp.down_proj.*NaN"):
        quantize(str(tiny_copy), tmp_path / "out", Recipe(QuantSpec(bits=4, group_size=64)))
    assert not (tmp_path / "out").exists()


def test_existing_output_refused(tiny_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LowbitError, match="--overwrite"):
        quantize(str(tiny_copy), out, Recipe(QuantSpec(bits=4, group_size=64)))
    assert (out / "keep.txt").read_text() == "precious"


def test_empty_text(tmp_path, smol):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(LowbitError, match="holds no text"):
        load_text(str(empty))
    with pytest.raises(LowbitError, match="empty"):
        calibration_batches(smol[1], "", 4, 16)
    with pytest.raises(LowbitError, match="need at least"):
        eval_windows(smol[1], "short text", 512)


def test_failed_run_leaves_previous_output(tiny_copy, tmp_path, monkeypatch):
    """--overwrite of a good model by a run that fails midway keeps the good model."""
    from lowbit.export import lowbit as checkpoint

    out = tmp_path / "out"
    quantize(str(tiny_copy), out, Recipe(QuantSpec(bits=4, group_size=64)))
    before = (out / "lowbit.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", boom)
    with pytest.raises(RuntimeError):
        quantize(str(tiny_copy), out, Recipe(QuantSpec(bits=2, group_size=64)), overwrite=True)
    assert (out / "lowbit.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
