"""prepare -> calibrate -> convert on a small trained CNN: accuracy within a point of fp32 for every
observer, outputs within the int8 steps, save / load bit-identical, bad input named."""

import copy

import pytest
import torch
from torch import nn

from lowbit import ptq
from lowbit.errors import LowbitError
from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.spec import OBSERVERS


def _data(n, g):
    """8x8 one-channel images of 10 classes: a fixed random template per class plus noise."""
    templates = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 0.9 * torch.randn(n, 1, 8, 8, generator=g), y


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = _data(2000, g)
    for _ in range(2):
        for i in range(0, 2000, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    model.eval()
    xt, yt = _data(1000, g)
    return model, x[:256], xt, yt


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("observer", OBSERVERS)
def test_static_int8_keeps_accuracy(trained, observer):
    model, calib, xt, yt = trained
    base = _acc(model, xt, yt)
    q = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static", observer))
    ptq.calibrate(q, calib.split(64))
    ptq.convert(q)
    kinds = [type(q.get_submodule(n)) for n in q._lowbit_converted["plan"]]
    assert kinds == [Int8Conv2d, Int8Conv2d, Int8Linear, Int8Linear]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert base > 0.9
    assert _acc(q, xt, yt) >= base - 0.01


def test_dynamic_int8_keeps_accuracy_and_logits(trained):
    model, _, xt, yt = trained
    q = ptq.convert(ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-dynamic")))
    with torch.no_grad():
        ref, got = model(xt), q(xt)
    assert _acc(q, xt, yt) >= _acc(model, xt, yt) - 0.005
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_batchnorm_folding_is_exact(trained):
    model = trained[0]
    folded = copy.deepcopy(model)
    from lowbit.ptq.fold_bn import fold_batchnorm

    assert fold_batchnorm(folded) == [("0", "1"), ("3", "4")]
    with torch.no_grad():
        torch.testing.assert_close(folded(trained[2]), model(trained[2]), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(trained, tmp_path):
    model, calib, xt, _ = trained
    q = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static", "percentile"))
    ptq.calibrate(q, [calib])
    ptq.convert(q)
    ptq.save(q, tmp_path / "cnn")
    r = ptq.load(_cnn(), tmp_path / "cnn")
    with torch.no_grad():
        assert torch.equal(r(xt), q(xt))
    ptq.save(r, tmp_path / "cnn", overwrite=True)  # a saved PTQ folder may be replaced
    with pytest.raises(LowbitError, match="exists"):
        ptq.save(r, tmp_path / "cnn")


def test_bad_input_names_the_module(trained):
    model, calib, _, _ = trained
    with pytest.raises(LowbitError, match="no module the scheme can quantize"):
        ptq.prepare(nn.Sequential(nn.ReLU(), nn.Tanh()), ptq.ptq_config("w8a8-static"))
    q = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static"))
    with pytest.raises(LowbitError, match=r"^0: calibration input has shape \(4, 3, 8, 8\)"):
        ptq.calibrate(q, [torch.randn(4, 3, 8, 8)])
    with pytest.raises(LowbitError, match="^0: calibration input has dtype torch.float64"):
        ptq.calibrate(q, [calib.double()])
    with pytest.raises(LowbitError, match="^0: calibration input has dtype torch.int64"):
        ptq.calibrate(q, [calib.long()])
    bad = calib.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(LowbitError, match="^0: .*NaN"):
        ptq.calibrate(q, [bad])
    fresh = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static"))
    with pytest.raises(LowbitError, match="no calibration data reached"):
        ptq.convert(fresh)
