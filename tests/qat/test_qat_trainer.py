"""The QAT trainer: a run killed and resumed ends bit-identical to an uninterrupted one; a NaN
loss stops with the last good checkpoint kept and restored; the loss log is written."""

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.qat import QATConfig, prepare_qat, qat_parameters
from lowbit.qat.losses import classification_loss
from lowbit.qat.trainer import LOSS_LOG, STATE, TrainConfig, TrainingDiverged, train
from lowbit.spec import SCHEMES


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    prepare_qat(model, QATConfig(SCHEMES["w4a8"]))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)

    def batch_fn(step):
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:16]
        return x[idx], y[idx]

    return model, batch_fn


class Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical(tmp_path):
    cfg = TrainConfig(steps=12, lr=1e-2, checkpoint_every=4, seed=5)
    a, batches = setup()
    ra = train(a, classification_loss, batches, cfg, *qat_parameters(a), state_dir=tmp_path / "a", progress=False)

    def kill(step, _loss):
        if step == 6:
            raise Killed

    b, batches = setup()
    with pytest.raises(Killed):
        train(b, classification_loss, batches, cfg, *qat_parameters(b), state_dir=tmp_path / "b", progress=False,
              on_step=kill)
    b, batches = setup()  # a new process: fresh model, same command
    rb = train(b, classification_loss, batches, cfg, *qat_parameters(b), state_dir=tmp_path / "b", progress=False)
    assert rb.resumed_from == 4  # the checkpoint after step 3
    assert rb.losses == ra.losses
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    log = (tmp_path / "b" / LOSS_LOG).read_text().splitlines()
    assert log[0] == "step,loss" and len(log) == 13
    assert ra.losses[-1] < ra.losses[0]


def test_other_settings_refuse_the_checkpoint(tmp_path):
    m, batches = setup()
    train(m, classification_loss, batches, TrainConfig(steps=2, lr=1e-2), *qat_parameters(m), state_dir=tmp_path,
          progress=False)
    m, batches = setup()
    with pytest.raises(LowbitError, match="other settings"):
        train(m, classification_loss, batches, TrainConfig(steps=2, lr=5e-2), *qat_parameters(m),
              state_dir=tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    m, batches = setup()
    weights, qparams = qat_parameters(m)
    cfg = TrainConfig(steps=40, lr=1e-2, checkpoint_every=2, grad_clip=None)
    blown = {}

    def blow_up(step, _loss):  # a learning rate that explodes after step 4
        if step == 4:
            for g in blown["opt"].param_groups:
                g["base_lr"] = 1e38

    import lowbit.qat.trainer as tr
    orig = tr.torch.optim.Adam

    def spy(*a, **k):
        blown["opt"] = orig(*a, **k)
        return blown["opt"]

    tr.torch.optim.Adam = spy
    try:
        with pytest.raises(TrainingDiverged, match=r"step 3, .*restored.*Lower the learning rate"):
            train(m, classification_loss, batches, cfg, weights, qparams, state_dir=tmp_path, progress=False,
                  on_step=blow_up)
    finally:
        tr.torch.optim.Adam = orig
    saved = torch.load(tmp_path / STATE, weights_only=True)
    assert saved["step"] == 3
    for n, p in m.named_parameters():
        if n in saved["params"]:
            assert torch.equal(p, saved["params"][n]) and bool(torch.isfinite(p).all())


def test_bad_settings():
    with pytest.raises(LowbitError, match="at least one step"):
        TrainConfig(steps=0)
    with pytest.raises(LowbitError, match="learning rate"):
        TrainConfig(steps=1, lr=float("nan"))
