"""`lowbit plan` and `lowbit quantize --target-bpw` on a 2-block Llama."""

import json

import pytest

GRID = ["--bits-options", "2,4,8", "--group-options", "32,0", "--samples", "4", "--seq-len", "64"]


@pytest.fixture(scope="module")
def meas(tmp_path_factory):
    """One measurement file for the module: the first command measures, later ones reuse it."""
    return tmp_path_factory.mktemp("measurement") / "m.json"


def test_plan_prints_layers_and_quantize_follows_it(lowbit_cli, tiny_dir, tmp_path, meas):
    r = lowbit_cli("plan", tiny_dir, "--target-bpw", "3.5", "--measurement", meas, *GRID)
    assert r.code == 0, r.err[-2000:]
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["layer", "option", "spec"]
    assert sum(line.startswith("model.layers.") for line in lines) == 14
    assert "total:" in lines[-1] and meas.is_file()
    r = lowbit_cli("plan", tiny_dir, "--target-bpw", "3.5", "--measurement", meas, "--json", *GRID)
    plan = json.loads(r.out)
    assert plan["bits"] <= 3.5 * plan["params"] and len(plan["choices"]) == 14

    out = tmp_path / "q"
    r = lowbit_cli("quantize", tiny_dir, "-o", out, "--target-bpw", "3.5", "--measurement", meas, *GRID)
    assert r.code == 0, r.err[-2000:]
    manifest = json.loads((out / "lowbit.json").read_text())
    layers = manifest["layers"]
    from lowbit.mixed.artifact import load_measurement

    m = load_measurement(meas)
    for name, opt in plan["choices"].items():
        assert layers[name]["spec"] == m.options[opt].to_dict()


def test_target_out_of_reach(lowbit_cli, tiny_dir, meas):
    r = lowbit_cli("plan", tiny_dir, "--target-bpw", "1.5", "--measurement", meas, *GRID)
    r.assert_error("--target-bpw 1.5 is outside what these options reach", "2.223 to 8.500")
    r = lowbit_cli("plan", tiny_dir, "--target-bpw", "12", "--measurement", meas, *GRID)
    r.assert_error("outside what these options reach")
    r = lowbit_cli("plan", tiny_dir, "--target-bpw", "3", "--measurement", meas, "--bits-options", "2,9")
    r.assert_error("option bits 9 is outside 2..8")
    r = lowbit_cli("plan", tiny_dir, "--target-bpw", "3", "--measurement", meas, "--option-symmetry", "both")
    r.assert_error("--option-symmetry must be auto, sym or asym")
