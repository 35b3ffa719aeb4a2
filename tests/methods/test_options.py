"""Method options are typed and validated before any work, from Python, recipes and the CLI."""

import dataclasses
import subprocess
import sys

import pytest

from lowbit.errors import LowbitError
from lowbit.methods import METHODS, get_method
from lowbit.methods.awq_gptq import AWQGPTQ
from lowbit.methods.gptq import GPTQOptions
from lowbit.recipe import load_recipe


def test_defaults_and_typed_values():
    m = get_method("gptq", damp=0.02, act_order=False)
    assert m.options == GPTQOptions(damp=0.02, act_order=False)
    assert get_method("gptq", {"block_size": 64}).options.block_size == 64
    assert get_method("awq", clip_skip=["q_proj"]).options.clip_skip == ("q_proj",)
    assert get_method("hqq", optimize_scale=None).options.optimize_scale is None
    assert isinstance(get_method("gptq", damp=1).options.damp, float)  # an int is a fine number


@pytest.mark.parametrize("name,opts,match", [
    ("gptq", {"dampp": 0.1}, r"no option 'dampp'; valid options: damp, block_size"),
    ("rtn", {"damp": 0.1}, r"'rtn' has no option 'damp'; valid options: none"),
    ("gptq", {"act_order": "no"}, r"'act_order' must be true or false; got 'no'"),
    ("gptq", {"block_size": 12.5}, r"'block_size' must be an integer"),
    ("gptq", {"block_size": True}, r"'block_size' must be an integer"),
    ("gptq", {"damp": "0.1"}, r"'damp' must be a number"),
    ("gptq", {"damp": -1.0}, r"'damp' must be > 0"),
    ("gptq", {"rounding": "nearest"}, r"'rounding' must be one of 'minmax', 'hqq'"),
    ("awq", {"clip_skip": "q_proj"}, r"'clip_skip' must be a list of strings"),
    ("awq+gptq", {"max_shrink": 1.5}, r"'max_shrink' must be in \[0, 1\)"),
    ("nope", {}, r"unknown method 'nope'; choose one of awq, awq\+gptq, gptq, hqq, rtn"),
])
def test_bad_options_name_the_key(name, opts, match):
    with pytest.raises(LowbitError, match=match):
        get_method(name, **opts)


def test_options_are_frozen_and_fingerprinted():
    m = get_method("gptq")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.options.damp = 1.0
    assert get_method("gptq", damp=0.02).fingerprint() != m.fingerprint()
    assert get_method("gptq", {"damp": 0.01}).fingerprint() == m.fingerprint()


def test_awq_gptq_composes_both_option_sets():
    fields = {f.name for f in dataclasses.fields(AWQGPTQ.Options)}
    assert {"n_grid", "search_samples"} <= fields and {f.name for f in dataclasses.fields(GPTQOptions)} <= fields
    assert not issubclass(METHODS["awq"], METHODS["gptq"])  # composition, not inheritance


@pytest.mark.parametrize("text,match", [
    ("method: gptq\nsym: false\n", r"unknown key 'sym'"),
    ("method: gptq\noptions: {dampp: 0.1}\n", r"recipe .*no option 'dampp'"),
    ("quantize_head: 'no'\n", r"'quantize_head' must be true or false"),
    ("bits: four\n", r"'bits' must be an integer"),
    ("bits: 4.7\n", r"'bits' must be an integer"),
    ("bits: 9\n", r"bits=9 is outside 2..8"),
    ("ignore: ['([']\n", r"not a valid regex"),
    ("- bits: 4\n", r"must be a mapping"),
    ("overrides: [{bits: 8}]\n", r"overrides\[0\] needs a 'pattern'"),
    ("overrides: [{pattern: down, bitz: 8}]\n", r"overrides\[0\]: unknown key 'bitz'"),
    ("method: 3\n", r"'method' must be a string"),
])
def test_recipe_validates_every_key(tmp_path, text, match):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(LowbitError, match=match):
        load_recipe(p)


def test_recipe_round_trip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: gptq\nbits: 3\ngroup_size: 64\nsymmetric: false\nquantize_head: true\n"
                 "overrides: [{pattern: down_proj, bits: 4}]\noptions: {damp: 0.02}\n")
    r = load_recipe(p)
    assert r.method == "gptq" and r.spec.bits == 3 and not r.spec.symmetric and r.quantize_head
    assert r.spec_for("model.layers.0.mlp.down_proj").bits == 4 and r.options == {"damp": 0.02}
    p.write_text("bits: 4\nhead: {bits: 8, granularity: channel}\n")
    r = load_recipe(p)
    assert r.quantize_head and r.head_spec.bits == 8 and r.head_spec.granularity == "channel"
    p.write_text("head: {bitz: 8}\n")
    with pytest.raises(LowbitError, match="'head' must be a mapping of spec keys"):
        load_recipe(p)


def test_cli_unknown_recipe_key_exits_2_naming_it(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: gptq\nsym: false\n")
    r = subprocess.run([sys.executable, "-c", "from lowbit.cli import main; main()", "quantize", "default",
                        "--recipe", str(p), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'sym'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unknown_method_option_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from lowbit.cli import main; main()", "quantize", "default",
                        "--method", "gptq", "--option", "dampp=0.1", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no option 'dampp'" in r.stderr and "Traceback" not in r.stderr
