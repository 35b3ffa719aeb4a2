"""The export boundary and side effects: records in, files out; nothing process-wide changes."""

import hashlib
import json

import pytest
import torch

from lowbit.errors import LowbitError


def _sha(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_library_changes_no_process_settings(tiny_dir, tmp_path):
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    grad = torch.is_grad_enabled()
    import lowbit

    lowbit.quantize(str(tiny_dir), method="gptq", bits=4, group_size=64, samples=2, seq_len=32,
                    out=tmp_path / "q", progress=False)
    lowbit.quantize(str(tiny_dir), method="hqq", bits=3, group_size=64, progress=False)
    assert torch.get_num_threads() == threads and torch.get_num_interop_threads() == interop
    assert torch.is_grad_enabled() == grad
    from lowbit.runtime import memory

    # the glibc settings are functools.cache'd: had anything called them, the cache would show it
    assert memory.share_one_arena.cache_info().currsize == 0
    assert memory.return_large_frees_to_os.cache_info().currsize == 0


def test_same_inputs_give_byte_identical_checkpoints(tiny_dir, tmp_path):
    import lowbit

    for out in ("a", "b"):
        lowbit.quantize(str(tiny_dir), method="gptq", bits=3, group_size=64, symmetric=False, samples=2,
                        seq_len=32, out=tmp_path / out, progress=False)
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "lowbit.json").read_text())
    assert "created" not in manifest and manifest["options"]["damp"] == 0.01


def test_records_saved_as_optimised_fp16_and_loaded_back_identically(tiny_dir, tmp_path):
    from lowbit.export import lowbit as fmt
    from lowbit.api import quantize_to, make_recipe

    model, _ = quantize_to(str(tiny_dir), tmp_path / "q", make_recipe(method="gptq", bits=4, group_size=64),
                           n_samples=2, seq_len=32, progress=False)
    qm = fmt.read(tmp_path / "q")
    assert len(qm.layers) == 14
    for name, qw in qm.layers.items():
        assert qw.scale.dtype == torch.float16 and qw.error is not None and 0 < qw.error < 1
        assert qw.bits_per_weight() == pytest.approx(4.25)  # 4-bit codes + one fp16 scale per 64
    loaded = qm.to_module()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_other_loaders_refuse_a_lowbit_checkpoint(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import lowbit

    lowbit.quantize(str(tiny_dir), method="rtn", bits=4, group_size=64, out=tmp_path / "q", progress=False)
    with pytest.raises(OSError, match="model.safetensors"):  # never a model with random weights
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_unknown_format_is_refused_before_work(tiny_dir, tmp_path):
    import lowbit

    with pytest.raises(LowbitError, match="unknown format 'onnx2'; choose one of lowbit, gptq"):
        lowbit.quantize(str(tiny_dir), method="rtn", out=tmp_path / "q", format="onnx2")
    assert not (tmp_path / "q").exists()


def test_generate_streams_and_reports_speed(tiny_dir, tmp_path):
    import subprocess
    import sys

    import lowbit

    lowbit.quantize(str(tiny_dir), method="rtn", bits=4, group_size=64, out=tmp_path / "q", progress=False)
    r = subprocess.run([sys.executable, "-c", "from lowbit.cli import main; main()", "generate", str(tmp_path / "q"),
                        "--prompt", "Hello", "-n", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "5 tokens in" in r.stderr and "tokens/s" in r.stderr
    from lowbit.runtime.generate import generate_text

    pieces = []
    out = generate_text(tmp_path / "q", "Hello", max_new_tokens=5, stream=pieces.append)
    assert out["new_tokens"] == 5 and "".join(pieces) == out["text"]


def test_calibrated_method_with_quantized_head(tiny_dir, tmp_path):
    """lm_head lies outside the calibrated blocks: it is rounded to nearest at its own spec."""
    import lowbit

    model, _ = lowbit.quantize(str(tiny_dir), method="gptq", bits=4, group_size=64, head_bits=8, samples=2,
                               seq_len=32, out=tmp_path / "q", progress=False)
    from lowbit.export import lowbit as fmt

    head = fmt.read(tmp_path / "q").layers["lm_head"]
    assert head.spec.bits == 8 and head.spec.granularity == "channel" and head.error is None
    assert type(model.lm_head).__name__ == "QuantLinear"
