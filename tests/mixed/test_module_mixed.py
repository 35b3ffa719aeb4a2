"""Mixed precision on the generic walk's layers (Conv2d + Linear): exact bits per option, errors that
fall with bits, a plan within the budget applied through quantize_module, and on a CNN trained on
Digits a 3.0-bit mix beating uniform 2-bit and matching uniform 3-bit."""

import copy
import itertools

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.mixed.measure import storage_bits
from lowbit.mixed.module import measure_module, model_output, plan_module_recipe
from lowbit.mixed.options import candidate_options
from lowbit.module_pipeline import quantize_module, weight_2d

OPTIONS = candidate_options(bits=(2, 4, 8), groups=(16, 0))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()


@pytest.fixture(scope="module")
def measured():
    m = cnn()
    torch.manual_seed(1)
    calib = list(torch.randn(96, 3, 8, 8).split(32))
    return m, calib, measure_module(m, calib, options=OPTIONS, progress=False)


def test_measurement_bits_are_the_stored_bits_and_options_fit(measured):
    m, _, meas = measured
    assert set(meas.layers) == {"0", "2", "5"} and meas.complete
    for name, layer in meas.layers.items():
        W = weight_2d(m.get_submodule(name)).float()
        fitting = {o.name for o in OPTIONS if o.fits(W.shape[1])}
        assert set(layer["bits"]) == fitting  # conv "0" has 27 patch values: per channel only
        for opt, bits in layer["bits"].items():
            assert bits == storage_bits(name, quantize(W, meas.options[opt]))
        assert layer["params"] == W.numel()
        # fewer bits, more error (per channel and per group alike)
        for g in ("ch", "g16"):
            errs = [layer["error"].get(f"w{b}{g}{'a' if b < 4 else 's'}") for b in (2, 4, 8)]
            if errs[0] is not None:
                assert errs[0] > 4 * errs[1] > 16 * errs[2] > 0, (name, g, errs)
        assert layer["sensitivity"] == pytest.approx(layer["kl"] / layer["probe_error"])


def test_sensitivity_is_the_output_error_per_unit_of_local_error(measured):
    m, calib, meas = measured
    # the probe's output error, recomputed: the last layer's output IS the model output, so its
    # output error equals the local one computed on the probe batches' Hessian up to the bias
    layer = m.get_submodule("5")
    W = layer.weight.detach()
    q = quantize(W, meas.options["w4chs"].__class__(bits=4, symmetric=False, granularity="channel")).dequantize()
    with torch.no_grad():
        ref = torch.cat([m(b) for b in calib[:2]])
        layer.weight.data.copy_(q)
        out = torch.cat([m(b) for b in calib[:2]])
        layer.weight.data.copy_(W)
    assert meas.layers["5"]["kl"] == pytest.approx(float(((out - ref) ** 2).sum() / (ref ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("target", [2.6, 4.0, 6.0])
def test_plan_within_budget_applied_per_layer(measured, target):
    m, calib, meas = measured
    recipe, plan = plan_module_recipe(meas, target)
    q = copy.deepcopy(m)
    rec = quantize_module(q, recipe, get_method("gptq"), calib, progress=False)
    assert set(rec) == set(plan.choices)
    for name, qw in rec.items():
        assert qw.spec == meas.options[plan.choices[name]]
    total = sum(storage_bits(n, r) for n, r in rec.items())
    assert total == plan.bits <= target * plan.params
    # the exact optimum: no combination of options within the budget predicts less error
    names = sorted(meas.layers)
    best = min(sum(meas.cost(n, o) for n, o in zip(names, combo))
               for combo in itertools.product(*(sorted(meas.layers[n]["bits"]) for n in names))
               if sum(meas.layers[n]["bits"][o] for n, o in zip(names, combo)) <= plan.budget_bits)
    assert plan.cost == pytest.approx(best, rel=1e-9)


def test_target_outside_reach_is_an_error(measured):
    _, _, meas = measured
    with pytest.raises(LowbitError, match="outside what these options reach"):
        plan_module_recipe(meas, 1.5)


def test_methods_that_cannot_measure_are_refused():
    m = cnn()
    x = [torch.randn(4, 3, 8, 8)]
    for method, msg in (("awq", "measures with gptq"), ("rtn", "calibrated method")):
        with pytest.raises(LowbitError, match=msg):
            lowbit.quantize_module(m, x, method=method, target_bpw=3.0, progress=False)
    with pytest.raises(LowbitError, match="target-bpw must be > 0"):
        lowbit.quantize_module(m, x, target_bpw=0, progress=False)


def test_model_output_picks_the_tensor():
    t = torch.ones(2)
    assert model_output(t) is t and model_output((t, 3)) is t and model_output({"logits": t}) is t
    with pytest.raises(LowbitError, match="tensor output"):
        model_output(3)


def test_mixed_3bpw_on_digits_beats_uniform_2bit(digits_cnn):
    m, x, y = digits_cnn
    calib, held, yh = list(x[:512].split(128)), x[1400:], y[1400:]
    with torch.no_grad():
        ref = m(held)

    def run(**kw):
        q = copy.deepcopy(m)
        rec = lowbit.quantize_module(q, calib, method="gptq", group_size=None, progress=False, **kw)
        with torch.no_grad():
            out = q(held)
        bits = sum(storage_bits(n, r) for n, r in rec.items()) / sum(r.codes.numel() for r in rec.values())
        return (float(((out - ref) ** 2).sum() / (ref ** 2).sum()), float((out.argmax(1) == yh).float().mean()), bits)

    mixed, w2, w3 = run(target_bpw=3.0), run(bits=2, symmetric=False), run(bits=3)
    fp = float((ref.argmax(1) == yh).float().mean())
    assert mixed[2] <= 3.0 < w3[2]
    assert mixed[0] < 0.5 * w2[0], (mixed, w2)
    assert mixed[0] < 1.5 * w3[0], (mixed, w3)
    assert mixed[1] >= fp - 0.01, (fp, mixed)
