"""Bad model files, output folders, calibration text and non-finite values get one clear error and
nothing written; interrupted runs resume by default; stale temporaries are cleaned. Through the
real entry point on the tiny 2-block Llama (tests/conftest.py)."""

import json
import logging
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.models import load_model

QUICK = ("--samples", "4", "--seq-len", "32")  # calibrated runs on the tiny model in ~1 s
RTN = ("--method", "rtn")  # where calibration is not the point


def _weights(folder):
    """The weights file of a model folder or lowbit checkpoint."""
    (f,) = folder.glob("*.safetensors")
    return f


def _edit_tensors(folder, edit):
    f = _weights(folder)
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})


def _nothing_written(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


# ---- model files ------------------------------------------------------------------------------

def test_unknown_model_type_is_one_line(lowbit_cli, tiny_copy, tmp_path):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "frobnitz", ["FrobnitzForCausalLM"]  # unknown to transformers too
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    lowbit_cli("quantize", tiny_copy, *RTN, "-o", out).assert_error("config.json", "'frobnitz' is not known", "llama")
    _nothing_written(tmp_path, out)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_header_without_data_offsets(lowbit_cli, tiny_copy, tmp_path):
    (tiny_copy / "model.safetensors").write_bytes(
        _safetensors_bytes({"model.norm.weight": {"dtype": "F32", "shape": [2]}}, b"\0" * 8))
    out = tmp_path / "out"
    lowbit_cli("quantize", tiny_copy, *RTN, "-o", out).assert_error("model.safetensors", "model.norm.weight", "data_offsets")
    _nothing_written(tmp_path, out)


def test_missing_weights_are_an_error_not_random_init(lowbit_cli, tiny_copy, tmp_path):
    def drop(t):
        del t["model.norm.weight"], t["model.layers.0.mlp.up_proj.weight"]

    _edit_tensors(tiny_copy, drop)
    with pytest.raises(LowbitError, match=r"lacks 2 weights .*model.layers.0.mlp.up_proj.weight, model.norm.weight"):
        load_model(tiny_copy)
    out = tmp_path / "out"
    lowbit_cli("quantize", tiny_copy, *RTN, "-o", out).assert_error(str(tiny_copy), "model.norm.weight", "random")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight",
                                 "model.layers.1.post_attention_layernorm.weight"])
def test_nan_in_any_parameter_is_named_before_work(lowbit_cli, tiny_copy, tmp_path, key):
    def poison(t):
        t[key][1] = float("nan")

    _edit_tensors(tiny_copy, poison)
    out = tmp_path / "out"
    lowbit_cli("quantize", tiny_copy, *RTN, "-o", out).assert_error(key, "NaN/Inf")
    _nothing_written(tmp_path, out)
    with pytest.raises(LowbitError, match=key):
        load_model(tiny_copy)  # eager loading too


def test_eval_refuses_a_checkpoint_with_nan(lowbit_cli, tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", out).code == 0
    _edit_tensors(out, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    lowbit_cli("eval", tiny_dir, out, "--windows", "1", "--seq-len", "32").assert_error(str(out), "model.norm.weight")


def test_eval_refuses_nonfinite_logits_naming_the_model():
    from lowbit.eval.quality import quality_pair

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Fake(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, input_ids, use_cache=False):
            return Out(torch.full((*input_ids.shape, 8), self.value))

    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(LowbitError, match="the quantized model out/q gives NaN/Inf logits on evaluation window 0"):
        quality_pair(Fake(0.0), Fake(float("nan")), ids, progress=False, labels=("orig", "the quantized model out/q"))
    with pytest.raises(LowbitError, match="orig gives NaN/Inf"):
        quality_pair(Fake(float("inf")), Fake(0.0), ids, progress=False, labels=("orig", "q"))


# ---- output folders ---------------------------------------------------------------------------

def test_output_is_cwd_or_a_parent(lowbit_cli, tiny_copy, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        lowbit_cli("quantize", tiny_copy, *RTN, "-o", out, "--overwrite").assert_error("current folder or one of its parents")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "work"] and list(work.iterdir()) == []


def test_output_holding_the_input_is_refused(lowbit_cli, tiny_copy, tmp_path):
    (tiny_copy.parent / "sub").mkdir()
    for out in (tiny_copy, tiny_copy.parent):
        lowbit_cli("quantize", tiny_copy, *RTN, "-o", out, "--overwrite").assert_error(str(out), "input")
    assert (tiny_copy / "model.safetensors").is_file()


def test_overwrite_replaces_only_a_lowbit_checkpoint_or_an_empty_folder(lowbit_cli, tiny_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    lowbit_cli("quantize", tiny_dir, *RTN, "-o", precious, "--overwrite").assert_error(str(precious), "not a lowbit checkpoint")
    assert (precious / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", empty, "--overwrite").code == 0
    assert (empty / "lowbit.json").is_file()
    assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", empty, "--overwrite", "--bits", "8").code == 0  # a checkpoint
    assert json.loads((empty / "lowbit.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]["spec"]["bits"] == 8
    model_folder = tmp_path / "model"  # a plain model folder (not the input): refused too
    model_folder.mkdir()
    (model_folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    lowbit_cli("quantize", tiny_dir, *RTN, "-o", model_folder, "--overwrite").assert_error(str(model_folder))
    hf_quantized = tmp_path / "gptq"  # a quantized checkpoint in a Hugging Face format: replaceable
    hf_quantized.mkdir()
    (hf_quantized / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", hf_quantized, "--overwrite").code == 0
    file_out = tmp_path / "file"
    file_out.write_text("x")
    lowbit_cli("quantize", tiny_dir, *RTN, "-o", file_out, "--overwrite").assert_error(str(file_out), "not a folder")


def test_default_model_cache_cannot_be_overwritten(lowbit_cli, default_dir, tmp_path):
    before = sorted(p.name for p in default_dir.iterdir())
    lowbit_cli("quantize", "default", "-o", default_dir, "--overwrite").assert_error(str(default_dir))
    lowbit_cli("quantize", "default", "-o", default_dir.parent, "--overwrite").assert_error(str(default_dir.parent))
    assert sorted(p.name for p in default_dir.iterdir()) == before


# ---- calibration text -------------------------------------------------------------------------

def test_calib_missing_binary_or_undecodable(lowbit_cli, tiny_dir, tmp_path):
    out = tmp_path / "out"
    binary = tmp_path / "blob"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 ".encode("latin-1") * 200)
    cases = [(tmp_path / "nope.txt", "no such file or folder"), (binary, "binary"), (latin, "not UTF-8")]
    for source, needle in cases:
        lowbit_cli("quantize", tiny_dir, "-o", out, "--method", "gptq", "--calib", source, *QUICK
                   ).assert_error(str(source), needle)
    # a method without calibration still refuses a missing path
    lowbit_cli("quantize", tiny_dir, *RTN, "-o", out, "--calib", tmp_path / "nope.txt").assert_error("nope.txt")
    _nothing_written(tmp_path, out)


def test_unused_calib_is_a_warning(lowbit_cli, tiny_dir, tmp_path, caplog):
    text = tmp_path / "calib.txt"
    text.write_text("some text " * 100)
    with caplog.at_level(logging.WARNING):
        r = lowbit_cli("quantize", tiny_dir, "-o", tmp_path / "out", "--method", "rtn", "--calib", text)
    assert r.code == 0, r.err
    assert any("--calib" in m and "not used" in m and "rtn" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", tmp_path / "out2").code == 0  # no --calib: no warning
    assert not any("--calib" in m for m in caplog.messages)


# ---- checks before loading --------------------------------------------------------------------

def test_arguments_are_checked_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    import lowbit.api
    import lowbit.models
    from lowbit.recipe import Recipe
    from lowbit.spec import QuantSpec

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(lowbit.models, "load_model", no_load)
    bad_group = Recipe(QuantSpec(bits=4, group_size=96))  # 96 does not divide 128
    with pytest.raises(LowbitError, match=r"group_size=96 .* model.layers.0.self_attn.q_proj"):
        lowbit.api.quantize_to(str(tiny_dir), tmp_path / "out", bad_group)
    good = Recipe(QuantSpec(bits=4, group_size=64), method="gptq")
    with pytest.raises(LowbitError, match="nope.txt"):
        lowbit.api.quantize_to(str(tiny_dir), tmp_path / "out", good, calib_text=str(tmp_path / "nope.txt"))
    with pytest.raises(LowbitError, match="n_samples=0"):
        lowbit.api.quantize_to(str(tiny_dir), tmp_path / "out", good, n_samples=0)
    head = Recipe(QuantSpec(bits=4, group_size=64), quantize_head=True, head_spec=QuantSpec(bits=4, group_size=96))
    with pytest.raises(LowbitError, match="lm_head"):
        lowbit.api.quantize_to(str(tiny_dir), tmp_path / "out", head)
    assert list(tmp_path.iterdir()) == []


def test_path_typos_fail_without_the_hub(lowbit_cli, tmp_path, monkeypatch):
    from lowbit.models.loader import resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for typo in ("models/smol", "./smol", "smol.gguf", "a/b/c", str(tmp_path / "nope")):
        with pytest.raises(LowbitError, match="no such file or folder"):
            resolve_source(typo)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M")[0] == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lowbit_cli("quantize", "someone/not-cached-model", "-o", "out").assert_error("someone/not-cached-model",
                                                                                "no such file or folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


# ---- resume by default, stale temporaries -----------------------------------------------------

def _tensors(folder):
    return load_file(_weights(folder))


def test_interrupted_quantize_resumes_with_the_same_command(lowbit_cli, tiny_dir, tmp_path, monkeypatch, caplog):
    import lowbit.pipeline

    args = ("quantize", tiny_dir, "--method", "gptq", "--bits", "3", *QUICK)
    ref = tmp_path / "ref"
    assert lowbit_cli(*args, "-o", ref).code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ref"]  # its state folder is gone after the save

    real_save = lowbit.pipeline.save_state

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(lowbit.pipeline, "save_state", save_then_interrupt)
    r = lowbit_cli(*args, "-o", out)
    assert r.code == 130 and "rerun the same command to resume" in r.err
    state = tmp_path / ".out.lowbit-state"
    assert (state / "block_0000.safetensors").is_file() and not out.exists()
    monkeypatch.setattr(lowbit.pipeline, "save_state", real_save)
    with caplog.at_level(logging.INFO):
        assert lowbit_cli(*args, "-o", out).code == 0
    assert any("resuming calibration after block 0" in m for m in caplog.messages)
    a, b = _tensors(ref), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()


def test_a_different_command_for_the_same_output_starts_over(lowbit_cli, tiny_dir, tmp_path, monkeypatch, caplog):
    import lowbit.pipeline

    real_save = lowbit.pipeline.save_state

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(lowbit.pipeline, "save_state", save_then_interrupt)
    assert lowbit_cli("quantize", tiny_dir, "--method", "gptq", "--bits", "3", *QUICK, "-o", out).code == 130
    monkeypatch.setattr(lowbit.pipeline, "save_state", real_save)
    with caplog.at_level(logging.INFO):
        r = lowbit_cli("quantize", tiny_dir, "--method", "gptq", "--bits", "4", *QUICK, "-o", out)
    assert r.code == 0, r.err
    assert any("different run" in m for m in caplog.messages)
    assert not any("resuming" in m for m in caplog.messages)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_explicit_state_dir_is_kept(lowbit_cli, tiny_dir, tmp_path):
    state = tmp_path / "state"
    assert lowbit_cli("quantize", tiny_dir, "--method", "gptq", *QUICK, "--state-dir", state, "-o", tmp_path / "q").code == 0
    assert (state / "calibration_state.safetensors").is_file()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sigkill_during_save_leaves_a_temporary_the_next_run_removes(lowbit_cli, tiny_dir, tmp_path):
    out = tmp_path / "out"
    code = ("import os, signal\n"
            "real = os.replace\n"
            "def replace(src, dst):\n"
            "    if '.tmp-' in str(src) and str(dst) == %r:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(src, dst)\n"
            "os.replace = replace\n"
            "from lowbit.cli import main\n"
            "main()\n") % str(out)
    r = subprocess.run([sys.executable, "-c", code, "quantize", str(tiny_dir), "--method", "rtn", "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and list(left[0].glob("*.safetensors")) and not out.exists()
    other = tmp_path / f".out.tmp-{_dead_pid()}-abc"  # another dead writer's, and one of an older naming
    other.mkdir()
    (tmp_path / ".out.tmp-xyz").mkdir()
    assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", out).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporaries_of_a_live_writer_are_kept(tmp_path):
    from lowbit.io.atomic import remove_stale_temporaries

    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    dead = tmp_path / f".out.old-{_dead_pid()}"
    unrelated = tmp_path / ".outer.tmp-1-abc"
    for p in (live, dead, unrelated):
        p.mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == [dead]
    assert live.exists() and unrelated.exists()


def test_planted_pickle_in_a_state_dir_is_refused(lowbit_cli, tiny_dir, tmp_path):
    import builtins
    import pickle

    class CreatesFile:
        def __reduce__(self):
            return builtins.open, (str(tmp_path / "pwned"), "w")

    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    (state / "calibration_state.safetensors").write_bytes(pickle.dumps({"x": CreatesFile()}))
    lowbit_cli("quantize", tiny_dir, "--method", "gptq", *QUICK, "--state-dir", state, "-o", out
               ).assert_error("calibration_state.safetensors", "delete it")
    assert not (tmp_path / "pwned").exists() and not out.exists()


# ---- eval -------------------------------------------------------------------------------------

def test_eval_is_quality_only_by_default_and_warns_when_busy(lowbit_cli, tiny_dir, tmp_path, monkeypatch, caplog):
    out = tmp_path / "q"
    assert lowbit_cli("quantize", tiny_dir, *RTN, "-o", out).code == 0
    r = lowbit_cli("eval", tiny_dir, out, "--windows", "1", "--seq-len", "32", "--json")
    res = json.loads(r.out)
    assert r.code == 0 and res["quantized"]["decode_tokens_per_s"] is None
    assert res["text"] == {"source": "pydoc", "part": "held-out", "windows": 1, "seq_len": 32}
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    with caplog.at_level(logging.WARNING):
        r = lowbit_cli("eval", tiny_dir, out, "--windows", "1", "--seq-len", "32", "--speed")
    assert r.code == 0 and "decode_tokens_per_s" in r.out
    assert any("busy" in m and "load average 64.00" in m for m in caplog.messages)


def test_eval_typo_fails_before_loading(lowbit_cli, tiny_dir, tmp_path, monkeypatch):
    import lowbit.models

    monkeypatch.setattr(lowbit.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    lowbit_cli("eval", tiny_dir, tmp_path / "nope").assert_error(str(tmp_path / "nope"), "does not exist")
    lowbit_cli("eval", tiny_dir, tiny_dir, "--text", tmp_path / "t.txt").assert_error("t.txt")
