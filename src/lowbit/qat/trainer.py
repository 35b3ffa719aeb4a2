"""A small deterministic training loop for QAT: progress bar with the loss, loss log, atomic
checkpoints, resume after a kill, stop on a non-finite loss keeping the last good checkpoint.

Deterministic for a seed: the batch of step i is `batch_fn(i)` (a function of the step, not of
the history), the learning rate a cosine of the step, and every step reseeds torch with
(seed, step); a run killed and rerun from its checkpoint ends bit-identical to an uninterrupted
one."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file, atomic_write_bytes

log = logging.getLogger(__name__)
STATE = "qat-state.pt"
LOSS_LOG = "loss.csv"


class TrainingDiverged(LowbitError):
    """The loss turned NaN / Inf: training stopped, the last good checkpoint kept."""


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps; lr: weights' peak learning rate (cosine decay to 0); qparam_lr:
    the quantization parameters' (LSQ scales, zero points, activation ranges; None = lr);
    checkpoint_every: steps between checkpoints (and at the end); grad_clip: max gradient norm
    (None: off)."""

    steps: int
    lr: float = 1e-4
    qparam_lr: float | None = None
    seed: int = 0
    checkpoint_every: int = 50
    grad_clip: float | None = 1.0
    warmup: int = 0

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise LowbitError(f"--steps {self.steps}: training needs at least one step")
        for key in ("lr", "qparam_lr"):
            v = getattr(self, key)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise LowbitError(f"{key}={v} must be a positive finite learning rate")
        if int(self.checkpoint_every) < 1:
            raise LowbitError(f"checkpoint_every={self.checkpoint_every} must be at least 1")

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per step, from step 0
    resumed_from: int = 0


def _named(model: nn.Module, params: list) -> dict[str, nn.Parameter]:
    ids = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _fingerprint(config: TrainConfig, names: list[str]) -> dict:
    return {"config": asdict(config), "params": names}


def _save(path: Path, step: int, named: dict, opt, losses: list[float], fp: dict) -> None:
    state = {"step": step, "params": {n: p.detach().clone() for n, p in named.items()},
             "optimizer": opt.state_dict(), "losses": list(losses), "fingerprint": fp}
    with atomic_file(path / STATE) as f:
        torch.save(state, f)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    w.writerows([i, f"{v:.6g}"] for i, v in enumerate(losses))
    atomic_write_bytes(path / LOSS_LOG, buf.getvalue().encode())


def read_checkpoint(file: Path, fp, what: str, settings: str) -> dict:
    """The state saved in `file`, refused (one LowbitError) when unreadable or written with another
    fingerprint; `what` names the checkpoint, `settings` what a different fingerprint means."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LowbitError(f"{file} is not a readable {what} checkpoint ({type(e).__name__}); "
                          "delete it to start over") from None
    if state.get("fingerprint") != fp:
        raise LowbitError(f"{file} was written by a {what} run with other {settings}; rerun with the same "
                          "settings to resume, or delete it to start over")
    return state


def _load(path: Path, named: dict, opt, fp: dict) -> tuple[int, list[float]] | None:
    file = path / STATE
    if not file.is_file():
        return None
    state = read_checkpoint(file, fp, "QAT", "settings (steps, learning rate, seed or trained parameters)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    return state["step"], list(state["losses"])


def restore_last_good(model: nn.Module, params: list, state_dir: str | Path) -> int | None:
    """Load the trained parameters of the checkpoint in `state_dir` into the model; its step."""
    file = Path(state_dir) / STATE
    if not file.is_file():
        return None
    state = torch.load(file, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for n, p in _named(model, params).items():
            p.copy_(state["params"][n])
    return state["step"]


def _checkpoint_step(step: int, config: TrainConfig) -> bool:
    return step % config.checkpoint_every == config.checkpoint_every - 1


def train(model: nn.Module, loss_fn: Callable[[nn.Module, object], torch.Tensor], batch_fn: Callable[[int], object],
          config: TrainConfig, weights: list, qparams: list = (), state_dir: str | Path | None = None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `weights` and `qparams` (Adam) for config.steps steps of loss_fn(model, batch_fn(i)).

    With `state_dir` a checkpoint (trained parameters, optimizer, loss log) is written atomically
    every `checkpoint_every` steps (once the next step's loss has shown the state finite) and at
    the end, and a rerun resumes from it. A non-finite loss
    raises TrainingDiverged after restoring the last good checkpoint's parameters (the file is
    kept). `on_step(step, loss)` runs after each finished step (evaluation, or a test's kill)."""
    groups = [{"params": list(weights), "lr": config.lr, "base_lr": config.lr}]
    if qparams:
        qlr = config.qparam_lr if config.qparam_lr is not None else config.lr
        groups.append({"params": list(qparams), "lr": qlr, "base_lr": qlr})
    all_params = [p for g in groups for p in g["params"]]
    if not all_params:
        raise LowbitError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.Adam(groups)
    named = _named(model, all_params)
    fp = _fingerprint(config, sorted(named))
    path = None if state_dir is None else Path(state_dir)
    start, losses = 0, []
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        loaded = _load(path, named, opt, fp)
        if loaded is not None:
            start, losses = loaded
            start += 1
            log.info("resuming QAT from step %d (%s)", start, path / STATE)
    result = TrainResult(config.steps, losses, resumed_from=start)
    last_good = start - 1 if start else None
    bar = tqdm(range(start, config.steps), desc="qat", unit="step", initial=start, total=config.steps,
               disable=not progress)
    for step in bar:
        torch.manual_seed(config.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * config.lr_factor(step)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch_fn(step))
        value = float(loss.detach())
        if not math.isfinite(value):
            where = (f"the parameters of the last good checkpoint (step {last_good}, {path / STATE}) are restored"
                     if last_good is not None and path is not None else "no checkpoint was written yet")
            if last_good is not None and path is not None:
                restore_last_good(model, all_params, path)
            raise TrainingDiverged(f"the training loss became {value} at step {step} (lr={config.lr}); stopped: "
                                   f"{where}. Lower the learning rate (--lr) and rerun")
        if path is not None and step > start and _checkpoint_step(step - 1, config):
            # the parameters after step-1 just gave a finite loss: a checkpoint is only ever a good state
            _save(path, step - 1, named, opt, losses, fp)
            last_good = step - 1
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(all_params, config.grad_clip)
        opt.step()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4g}")
        if path is not None and step == config.steps - 1:
            _save(path, step, named, opt, losses, fp)
        if on_step is not None:
            on_step(step, value)
    bar.close()
    return result
