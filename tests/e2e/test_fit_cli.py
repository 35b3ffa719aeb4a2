"""`lowbit fit` on a 2-block Llama: the plan within the budget (--no-apply, --json), the applied
checkpoint (its measured bytes equal the prediction, its manifest names the KV cache), bad input."""

import json
import re

import pytest

GRID = ["--bits-options", "2,4,8", "--group-options", "32,0", "--samples", "4", "--seq-len", "64",
        "--kv-methods", "turboquant,kivi", "--kv-bits", "2,3,4", "--kv-windows", "1", "--kv-seq-len", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    return ["--measurement", d / "m.json", "--kv-measurement", d / "kv.json"]


def _minimum(r) -> float:
    line = r.assert_error("is below what", "at --context 256", "at least")
    return float(re.search(r"at least ([0-9.,]+) MB", line).group(1).replace(",", ""))


def test_fit_plan_within_budget(lowbit_cli, tiny_dir, files):
    low = _minimum(lowbit_cli("fit", tiny_dir, "--memory", "1MB", "--context", "256", "--no-apply", *GRID, *files))
    assert 25 < low < 40  # 25.2 MB of fp32 embeddings + a few MB of 2-bit weights and cache
    for extra in (0.3, 2.0, 1000.0):
        budget = int((low + extra) * 1e6)
        r = lowbit_cli("fit", tiny_dir, "--memory", str(budget), "--context", "256", "--no-apply", "--json",
                       *GRID, *files)
        assert r.code == 0, r.err[-2000:]
        plan = json.loads(r.out)
        assert plan["memory"]["total_bytes"] <= budget and len(plan["choices"]) == 14
        assert plan["predicted_kl"] == pytest.approx(2.0 * plan["weight_kl_predicted"] + plan["kv_kl"])
    assert plan["kv"] == "fp" and set(plan["choices"].values()) == {"w8g32s"}  # room for everything
    r = lowbit_cli("fit", tiny_dir, "--memory", f"{low + 0.3}MB", "--context", "256", "--no-apply", *GRID, *files)
    assert r.code == 0, r.err[-2000:]
    assert "<- chosen" in r.out and "per layer kind:" in r.out and "decode working set" in r.out


def test_fit_applies_and_records_the_cache(lowbit_cli, tiny_dir, files, tmp_path):
    out = tmp_path / "q"
    r = lowbit_cli("fit", tiny_dir, "--memory", "27MB", "--context", "256", "-o", out, "--json",
                   "--eval-windows", "1", "--eval-seq-len", "64", *GRID, *files)
    assert r.code == 0, r.err[-2000:]
    res = json.loads(r.out)
    m = res["measured"]
    assert m["weight_bytes_measured"] == m["weight_bytes_predicted"]
    assert m["kv_bytes_measured"] == m["kv_bytes_predicted"]
    assert m["perplexity"] > 0 and m["kl"] >= 0
    manifest = json.loads((out / "lowbit.json").read_text())
    kv = manifest["kv_cache"]
    assert kv["context"] == 256 and kv["memory_budget_bytes"] == 27_000_000
    assert (kv["method"] if kv["method"] == "fp" else f"{kv['method']}-{kv['bits']:g}") == res["kv"]
    from lowbit.mixed.kv_options import cache_from_meta
    from transformers import AutoConfig

    cache = cache_from_meta(kv, AutoConfig.from_pretrained(out))
    assert type(cache).__name__ == ("DynamicCache" if kv["method"] == "fp" else "QuantizedKVCache")


@pytest.mark.parametrize("args,needles", [
    (["--memory", "lots"], ["--memory 'lots' is not a memory size"]),
    (["--memory", "-3MB"], ["--memory"]),
    (["--memory", "600MB", "--context", "0"], ["--context must be a positive"]),
    (["--memory", "600MB", "--kv-methods", "nope"], ["unknown KV method 'nope'"]),
    (["--memory", "600MB", "--kv-bits", "x"], ["--kv-bits must be comma-separated"]),
])
def test_fit_bad_input(lowbit_cli, tiny_dir, args, needles):
    if "--context" not in args:
        args = [*args, "--context", "256"]
    lowbit_cli("fit", tiny_dir, *args, "--no-apply").assert_error(*needles)
