"""`lowbit report` end to end on the bundled SmolLM2 (one small RTN checkpoint, the same records in
compressed-tensors too), and its bad input: one error line naming the file, exit 2, nothing written."""

import json

import pytest

FAST = ["--windows", "2", "--seq-len", "64", "--decode-tokens", "2", "--prefill-len", "16", "--task-questions", "4",
        "--layer-windows", "1", "--lm-eval-tasks", "", "--quiet"]


@pytest.fixture(scope="module")
def rtn_ckpt(tmp_path_factory, default_dir):
    """SmolLM2 with only the first two blocks RTN-quantized (W4 g64), time and peak RSS recorded,
    and the same records in the compressed-tensors layout."""
    import lowbit
    from lowbit.export import read, write

    root = tmp_path_factory.mktemp("report")
    out = root / "rtn-w4"
    lowbit.quantize("default", method="rtn", bits=4, group_size=64, ignore=(r"layers\.([2-9]|[1-9]\d)\.",),
                    out=out, record_stats=True, progress=False)
    write(read(out), root / "rtn-w4-ct", "compressed-tensors")
    return out, root / "rtn-w4-ct"


@pytest.mark.slow
def test_report_writes_every_file_with_consistent_figures(lowbit_cli, rtn_ckpt, tmp_path):
    ckpt, gptq_ckpt = rtn_ckpt
    out = tmp_path / "report"
    r = lowbit_cli("report", "default", ckpt, gptq_ckpt, "-o", out, *FAST)
    assert r.code == 0, r.err[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["layer_error.png", "quality_vs_bits.png", "report.html",
                                                      "report.json", "report.md", "speed_vs_size.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rep = json.loads((out / "report.json").read_text())
    orig, lb, gq = rep["checkpoints"]
    assert [orig["label"], lb["format"], gq["format"]] == ["original", "lowbit", "compressed-tensors"]
    assert rep["text"] == {"source": "pydoc", "part": "held-out", "windows": 2, "seq_len": 64, "tokens": 126}
    # the same records in two formats: the same model, the same figures
    for key in ("perplexity", "kl", "top1_agreement", "bits_per_weight"):
        assert gq[key] == pytest.approx(lb[key], rel=1e-6), key
    assert orig["bits_per_weight"] == 32.0 and orig["kl"] == 0.0
    # 2 of 30 blocks at 4.25 bits, the rest fp32
    assert lb["bits_per_weight"] == pytest.approx((2 * 4.25 + 28 * 32) / 30, rel=1e-3)
    assert orig["perplexity"] < lb["perplexity"] < 1.5 * orig["perplexity"]
    s = lb["kl_stats"]
    assert s["mean"] == pytest.approx(lb["kl"], rel=1e-4)
    assert 0 <= s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"]
    assert lb["quantize_stats"]["seconds"] > 0 and lb["quantize_stats"]["peak_rss_bytes"] > 2**27
    assert gq["quantize_stats"] is None
    assert lb["size_bytes"] < orig["size_bytes"] and lb["memory_bytes"] < orig["memory_bytes"]
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 for row in rep["checkpoints"])
    # tasks: no lm-eval task requested (their data is not on this machine: tests/report/test_tasks.py),
    # so lowbit's own scoring ran, and the report says so
    assert rep["tasks"]["scorer"] == "lowbit" and rep["tasks"]["why"].startswith("no lm-eval task requested")
    assert all(0 <= row["tasks"]["pydoc-continuation"]["acc"] <= 1 for row in rep["checkpoints"])
    # per-layer error: RTN stores none, so measured for the 14 quantized Linears, equal across formats
    errs = rep["layer_errors"]
    assert len(errs["rtn-w4"]["layers"]) == 14
    for name, e in errs["rtn-w4"]["layers"].items():
        assert e["source"] == "measured" and e["bound"] == 4.0 ** -4 and 0 < e["rel_error"] < 0.2
        assert errs["rtn-w4-ct"]["layers"][name]["rel_error"] == pytest.approx(e["rel_error"], rel=1e-5)
    assert rep["pareto"]["perplexity"][0] in ("rtn-w4", "rtn-w4-ct")
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for doc in (md, html):
        assert "rtn-w4-ct" in doc and "quality_vs_bits.png" in doc and "pydoc-continuation" in doc
        assert "own multiple-choice scoring" in doc
    assert f"{lb['perplexity']:.3f}" in md
    # deterministic: the same seed gives the same quality figures and task scores
    out2 = tmp_path / "again"
    assert lowbit_cli("report", "default", ckpt, "-o", out2, "--no-speed", *FAST).code == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["checkpoints"][1]["perplexity"] == lb["perplexity"]
    assert rep2["checkpoints"][1]["tasks"] == lb["tasks"]
    assert rep2["layer_errors"]["rtn-w4"] == errs["rtn-w4"]


def test_missing_checkpoint_is_one_error_naming_it(lowbit_cli, tmp_path):
    out = tmp_path / "rep"
    r = lowbit_cli("report", "default", tmp_path / "nope", "-o", out)
    r.assert_error(str(tmp_path / "nope"), "does not exist")
    assert not out.exists()


def test_existing_output_without_overwrite_is_refused(lowbit_cli, tmp_path, rtn_ckpt):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = lowbit_cli("report", "default", rtn_ckpt[0], "-o", out)
    r.assert_error(str(out), "--overwrite")
    r = lowbit_cli("report", "default", rtn_ckpt[0], "-o", out, "--overwrite")
    r.assert_error(str(out), "report.json")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_checkpoint_of_another_model_is_refused(lowbit_cli, tmp_path, tiny_dir):
    import lowbit

    other = tmp_path / "tiny-rtn"
    lowbit.quantize(str(tiny_dir), method="rtn", bits=4, group_size=64, out=other, progress=False)
    out = tmp_path / "rep"
    r = lowbit_cli("report", "default", other, "-o", out)
    r.assert_error(str(other), "another model", "hidden_size")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-rtn"]
