"""`lowbit train-qat`: bad input is one error line (exit 2) before any work; a short real run
saves a checkpoint lowbit loads."""

import pytest


@pytest.mark.parametrize("args, needle", [
    (["--scheme", "w9g7"], "--scheme 'w9g7' is unknown"),
    (["--scheme", "w4a8"], "weight-only LLM schemes"),
    (["--scheme", "w4g128"], "group_size=128 does not divide"),
    (["--init", "hqq"], "--init 'hqq' is unknown"),
    (["--method", "adam"], "--method 'adam' is unknown"),
    (["--batch", "64"], "--calib-samples 32 must be at least --batch 64"),
    (["--steps", "0"], "--steps 0"),
    (["--lr", "-1"], "lr=-1.0"),
    (["--data", "{tmp}/missing.txt"], "no such file"),
    (["--data", "{tmp}/empty.txt"], "holds no text"),
])
def test_bad_input(lowbit_cli, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("  \n")
    out = tmp_path / "out"
    r = lowbit_cli("train-qat", "default", "-o", out, *[a.format(tmp=tmp_path) for a in args])
    r.assert_error(needle)
    assert not out.exists()


@pytest.mark.slow
def test_too_short_data_and_a_short_run(lowbit_cli, tmp_path):
    import torch

    import lowbit

    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n\n" * 3)
    r = lowbit_cli("train-qat", "default", "-o", tmp_path / "a", "--data", short, "--init", "rtn", "--steps", "1")
    r.assert_error("--data", "too short")
    short.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(30)))
    r = lowbit_cli("train-qat", "default", "-o", tmp_path / "a", "--data", short, "--init", "rtn", "--steps", "1")
    r.assert_error("tokens", "--seq-len")
    out = tmp_path / "out"
    r = lowbit_cli("train-qat", "default", "-o", out, "--init", "rtn", "--steps", "2", "--batch", "1", "--seq-len",
                   "32", "--checkpoint-every", "1")
    assert r.code == 0, r.err[-2000:]
    assert "saved" in r.out
    model, tok = lowbit.load(out)
    ids = tok("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids).logits).all())
    assert not any(p.name.startswith(".out.lowbit-qat-state") for p in tmp_path.iterdir())  # removed after the save
