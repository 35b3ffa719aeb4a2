"""Measurement on a 2-block random Llama: exact bits, sane errors, reuse and resume, and the
plan applied through the pipeline."""

import json

import pytest
import torch

from lowbit.mixed.allocate import allocate, measurement_layers
from lowbit.mixed.apply import plan_recipe
from lowbit.mixed.artifact import load_measurement
from lowbit.mixed.measure import measure, storage_bits
from lowbit.mixed.options import candidate_options

OPTIONS = candidate_options(bits=(2, 4, 8), groups=(32, 0))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from lowbit.models import load_model

    model, _ = load_model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 49152, (4, 64), generator=g)
    sens = torch.randint(0, 49152, (2, 32), generator=g)
    return model, calib, sens


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory):
    model, calib, sens = tiny
    path = tmp_path_factory.mktemp("meas") / "m.json"
    return measure(model, calib, sens, options=OPTIONS, path=path, progress=False), path


def test_every_layer_every_option(measured, tiny):
    meas, _ = measured
    model = tiny[0]
    assert meas.complete and len(meas.layers) == 2 * 7
    for name, layer in meas.layers.items():
        w = dict(model.named_modules())[name].weight
        assert layer["params"] == w.numel()
        assert set(layer["bits"]) == {o.name for o in OPTIONS}  # 128 and 256 inputs: 32 divides both
        for o in OPTIONS:
            rows, cols = w.shape
            side = rows * (cols // 32 if o.spec.granularity == "group" else 1) * 16  # fp16 scales
            side *= 1 if o.spec.symmetric else 2  # and fp16 zeros
            assert layer["bits"][o.name] == rows * cols * o.spec.bits + side
        err = layer["error"]
        assert err["w8g32s"] < 1e-3 < err["w2g32a"]
        assert err["w8g32s"] < err["w4g32s"] < err["w2g32a"]
        assert err["w4g32s"] <= err["w4chs"] * 1.05
        assert layer["probe_error"] > 0 and layer["kl"] > 0 and layer["sensitivity"] > 0


def test_storage_bits_is_what_the_checkpoint_holds():
    from lowbit.core.quantize import quantize
    from lowbit.spec import QuantSpec

    qw = quantize(torch.randn(16, 96), QuantSpec(bits=3, symmetric=False, group_size=32))
    assert storage_bits("x", qw) == 16 * 96 * 3 + 2 * 16 * 3 * 16


def test_rerun_reuses_and_resume_is_identical(measured, tiny):
    meas, path = measured
    model, calib, sens = tiny
    stamp = path.stat().st_mtime_ns
    again = measure(model, calib, sens, options=OPTIONS, path=path, progress=False)
    assert path.stat().st_mtime_ns == stamp and again.to_json() == meas.to_json()
    # an interrupted run: only block 0 saved -> the rerun measures block 1 alone, same figures
    d = json.loads(path.read_text())
    d["blocks_done"] = 1
    d["layers"] = {k: v for k, v in d["layers"].items() if v["block"] == 0}
    partial = path.with_name("partial.json")
    partial.write_text(json.dumps(d))
    resumed = measure(model, calib, sens, options=OPTIONS, path=partial, progress=False)
    assert resumed.layers == meas.layers
    # other data -> another key: not reused
    other = measure(model, calib[:2], sens, options=OPTIONS, path=partial, progress=False)
    assert other.key != meas.key


def test_reused_measurement_gives_the_identical_plan(measured):
    meas, path = measured
    for target in (2.6, 3.5, 5.0):
        a = allocate(measurement_layers(meas), target)
        b = allocate(measurement_layers(load_measurement(path)), target)
        assert a == b and a.bits <= a.budget_bits


def test_plan_applies_through_the_pipeline(measured, tiny_dir):
    from lowbit.methods import get_method
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model

    meas, _ = measured
    plan = allocate(measurement_layers(meas), 3.5)
    assert len(set(plan.choices.values())) > 1  # mixed, not uniform
    recipe = plan_recipe(plan, meas)
    model, _ = load_model(tiny_dir)
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    records = quantize_model(model, recipe, get_method("gptq"), calib, progress=False)
    assert set(records) == set(plan.choices)
    total = 0
    for name, qw in records.items():
        assert qw.spec == meas.options[plan.choices[name]]
        total += storage_bits(name, qw)
    assert total == plan.bits <= 3.5 * plan.params
