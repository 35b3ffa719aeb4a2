"""Block-AP (EfficientQAT, Chen et al. 2024): block by block, train a fake-quantized block's
weights and step sizes (+ zero points) to reproduce the full-precision block's outputs (MSE) on
cached calibration inputs, starting from the PTQ record (GPTQ / RTN / AWQ).

The block walk is the PTQ pipeline's (`lowbit.calibration.capture`): block 0's inputs are
captured once; block i trains on the outputs of the already-trained quantized blocks before it,
and its trained outputs feed block i + 1. Its target (`target`) is the full-precision model's own
stream ("fp", EfficientQAT's: the fp block i on the fp block i - 1's outputs, so a block also
corrects the error its inputs carry) or the fp block i on the quantized stream's inputs
("quantized", GPTQ's view). A block whose training left its MSE (on the `holdout` chunks it never
trained on, else on all chunks) no lower than its start keeps its start (`keep_better`). Each
block trains with `qat.trainer.train` (Adam, cosine learning rate, per-step reseeding, stop on a
non-finite loss), so a run is deterministic for a seed. With `state_dir` every finished
block is committed (its trained parameters, the next block's inputs) and a rerun resumes after it.

Why blocks: one optimizer step costs one block's forward and backward on a few windows instead of
the whole model's plus the teacher's (on SmolLM2-135M, ~1 s instead of ~50 s of CPU time), so a
fixed CPU budget buys hundreds of steps per block instead of tens in total.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.calibration.capture import (BlockInputs, capture_first_block_inputs, cast_kwargs, kwargs_for,
                                         run_block)
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file
from lowbit.models.arch import arch_for, blocks_of
from lowbit.qat.prepare import qat_layers, qat_parameters
from lowbit.qat.trainer import TrainConfig, read_checkpoint, train

log = logging.getLogger(__name__)
STATE = "block-ap-state.pt"


@dataclass(frozen=True)
class BlockAPConfig:
    """steps: optimizer steps per block; batch: calibration windows per step (the captured
    chunks); lr: the weights' peak learning rate (cosine to 0 within each block); qparam_lr: the
    scales' / zeros'; train_weights: False trains the quantization parameters only; scale_grad:
    "held" (the scales' / zeros' gradient with the codes held, right at a PTQ start whose weights
    sit on the grid) or "lsq" (LSQ's, for weights off the grid). target: "fp" (the fp model's
    own stream) or "quantized" (the fp block on the quantized stream's inputs); holdout: chunks
    (of `batch` windows) never trained on, that judge `keep_better` (0: all chunks judge)."""

    steps: int = 100
    batch: int = 4
    lr: float = 1e-4
    qparam_lr: float = 1e-4
    seed: int = 0
    train_weights: bool = True
    grad_clip: float | None = None
    scale_grad: str = "held"
    target: str = "fp"
    keep_better: bool = True
    holdout: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitError(f"Block-AP {key}={v!r} must be a positive integer")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise LowbitError(f"Block-AP holdout={self.holdout!r} must be a non-negative integer")
        if self.scale_grad not in ("held", "lsq"):
            raise LowbitError(f"Block-AP scale_grad={self.scale_grad!r}; choose 'held' or 'lsq'")
        if self.target not in ("fp", "quantized"):
            raise LowbitError(f"Block-AP target={self.target!r}; choose 'fp' or 'quantized'")
        for key in ("lr", "qparam_lr"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise LowbitError(f"Block-AP {key}={v} must be a positive finite learning rate")

    def train_config(self, block: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, qparam_lr=self.qparam_lr,
                           seed=self.seed * 1_009 + block, checkpoint_every=self.steps, grad_clip=self.grad_clip)


@dataclass
class BlockAPResult:
    blocks: int  # blocks trained (with the resumed ones)
    losses: dict[int, list[float]] = field(default_factory=dict)  # block -> its per-step MSE
    start_mse: dict[int, float] = field(default_factory=dict)  # block -> MSE of its PTQ start on all chunks
    end_mse: dict[int, float] = field(default_factory=dict)  # block -> MSE after training (or kept start)
    kept_start: list[int] = field(default_factory=list)  # blocks whose training was undone (keep_better)
    resumed_from: int = 0
    stopped_at: int | None = None  # the first block left at its PTQ start by `stop`


class _Stop(Exception):
    pass


def _mse_of(outs: list[torch.Tensor], targets: list[torch.Tensor], chunks: list[int] | None = None) -> float:
    chunks = range(len(targets)) if chunks is None else chunks
    return sum(float(F.mse_loss(outs[c].float(), targets[c].float(), reduction="sum")) for c in chunks) / \
        sum(targets[c].numel() for c in chunks)


def _fingerprint(config: BlockAPConfig, calib_ids: torch.Tensor, names: list[str]) -> str:
    h = hashlib.sha256(repr((asdict(config), names)).encode())
    h.update(calib_ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def _block_file(path: Path, block: int) -> Path:
    return path / f"block-ap-{block:04d}.pt"


def _save(path: Path, block: int, fp: str, params: dict, hidden: list[torch.Tensor], fp_hidden: list | None,
          result: BlockAPResult) -> None:
    """The block's trained tensors, then the state (the next block's inputs): the commit point."""
    with atomic_file(_block_file(path, block)) as f:
        torch.save({"fingerprint": fp, "params": params}, f)
    state = {"block": block, "fingerprint": fp, "hidden": hidden, "fp_hidden": fp_hidden,
             "losses": result.losses, "start_mse": result.start_mse, "end_mse": result.end_mse,
             "kept_start": result.kept_start}
    with atomic_file(path / STATE) as f:
        torch.save(state, f)


def _load(path: Path, fp: str) -> dict | None:
    file = path / STATE
    if not file.is_file():
        return None
    return _load_file(file, fp)


def _load_file(file: Path, fp: str) -> dict:
    return read_checkpoint(file, fp, "Block-AP", "settings or calibration data")


def _trained(model, block: int, arch) -> dict[str, torch.Tensor]:
    """The tensors of block `block`'s fake-quantized layers (by parameter name)."""
    prefix, names = f"{arch.blocks}.{block}.", _layer_names(model)
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith(prefix) and n.rsplit(".", 1)[0] in names}


def _layer_names(model) -> set[str]:
    cache = getattr(model, "_lowbit_qat_names", None)
    if cache is None:
        cache = set(qat_layers(model))
        object.__setattr__(model, "_lowbit_qat_names", cache)
    return cache


def block_ap(student, teacher, calib_ids: torch.Tensor, config: BlockAPConfig, *, state_dir: str | Path | None = None,
             progress: bool = True, stop: Callable[[], bool] | None = None,
             on_block: Callable[[int, BlockAPResult], None] | None = None) -> BlockAPResult:
    """Train `student` (prepared by `prepare_qat`, same architecture as `teacher`) block by block
    on calibration windows `calib_ids` [n, seq]; in place. `stop()` is asked between steps (a
    time budget): when it says True the current block keeps its PTQ start and the walk ends.
    `on_block(i, result)` runs after each finished block (evaluation, or a test's kill)."""
    arch = arch_for(student)
    s_blocks, t_blocks = blocks_of(student, arch), blocks_of(teacher, arch)
    if len(s_blocks) != len(t_blocks):
        raise LowbitError(f"Block-AP: the student has {len(s_blocks)} blocks, the teacher {len(t_blocks)}")
    need = config.batch * (config.holdout + 1)
    if calib_ids.dim() != 2 or calib_ids.shape[0] < need:
        raise LowbitError(f"Block-AP needs at least batch={config.batch} x (holdout={config.holdout} + 1) = {need} "
                          f"calibration windows; got {tuple(calib_ids.shape)}")
    for layer in qat_layers(student).values():
        layer.held_codes = config.scale_grad == "held"
    fp = _fingerprint(config, calib_ids, sorted(_layer_names(student)))
    path = None if state_dir is None else Path(state_dir)
    inputs, kwargs = capture_first_block_inputs(teacher, arch, calib_ids, chunk=config.batch, dtype=torch.float32)
    hidden = inputs.hidden
    fp_hidden = hidden if config.target == "fp" else None  # the fp model's stream
    n_train = len(hidden) - config.holdout
    judge = list(range(n_train, len(hidden))) or None  # the chunks keep_better judges on
    result = BlockAPResult(blocks=0)
    start = 0
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        state = _load(path, fp)
        if state is not None:
            named = dict(student.named_parameters())
            with torch.no_grad():
                for b in range(state["block"] + 1):
                    block_state = _load_file(_block_file(path, b), fp)
                    for n, t in block_state["params"].items():
                        named[n].copy_(t)
            hidden, fp_hidden = state["hidden"], state["fp_hidden"]
            start = state["block"] + 1
            result.losses, result.start_mse, result.end_mse = state["losses"], state["start_mse"], state["end_mse"]
            result.kept_start = state["kept_start"]
            result.resumed_from = start
            log.info("Block-AP: resuming after block %d (%s)", start - 1, path / STATE)
    result.blocks = start
    bar = tqdm(range(start, len(s_blocks)), desc="block-ap", unit="block", initial=start, total=len(s_blocks),
               disable=not progress)
    was_training = student.training
    for i in bar:
        sb, tb = s_blocks[i], t_blocks[i]
        here = BlockInputs(hidden, kwargs[i])
        # the fp model's own stream, or the fp block on the quantized stream's inputs
        targets = run_block(tb, here if fp_hidden is None else BlockInputs(fp_hidden, kwargs[i]))
        start_outs = run_block(sb, here)
        result.start_mse[i] = _mse_of(start_outs, targets)
        start_judged = _mse_of(start_outs, targets, judge)
        weights, qparams = qat_parameters(sb, train_weights=config.train_weights, train_bias=config.train_weights)
        kw = cast_kwargs(kwargs[i], torch.float32)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 7_919 + i))

        def batch_fn(step: int) -> int:
            return int(order[step % len(order)])

        def loss_fn(block, c: int) -> torch.Tensor:
            out = block(hidden[c], **kwargs_for(kw, hidden[c].shape[0]))
            out = out[0] if isinstance(out, tuple) else out
            return F.mse_loss(out.float(), targets[c].float())

        def on_step(_step: int, _loss: float) -> None:
            if stop is not None and stop():
                raise _Stop

        if stop is not None and stop():
            result.stopped_at = i
            break
        sb.train()
        snapshot = {n: p.detach().clone() for n, p in sb.named_parameters()}
        try:
            res = train(sb, loss_fn, batch_fn, config.train_config(i), weights, qparams, progress=False,
                        on_step=on_step)
        except _Stop:
            with torch.no_grad():  # a block cut short keeps its PTQ start
                for n, p in sb.named_parameters():
                    p.copy_(snapshot[n])
            result.stopped_at = i
            break
        finally:
            sb.train(was_training)
            for p in sb.parameters():
                p.requires_grad_(False)
        result.losses[i] = res.losses
        outs = run_block(sb, here)
        if config.keep_better and _mse_of(outs, targets, judge) >= start_judged:
            with torch.no_grad():  # training made this block worse: it keeps its PTQ start
                for n, p in sb.named_parameters():
                    p.copy_(snapshot[n])
            outs = start_outs
            result.kept_start.append(i)
        hidden = outs  # the next block's inputs
        fp_hidden = None if fp_hidden is None else targets
        result.end_mse[i] = _mse_of(hidden, targets)
        result.blocks = i + 1
        bar.set_postfix(mse=f"{result.start_mse[i]:.3g}->{result.end_mse[i]:.3g}")
        log.info("Block-AP block %d: MSE %.4g -> %.4g (%d steps%s)", i, result.start_mse[i], result.end_mse[i],
                 len(res.losses), ", start kept" if i in result.kept_start else "")
        if path is not None:
            _save(path, i, fp, _trained(student, i, arch), hidden, fp_hidden, result)
        if on_block is not None:
            on_block(i, result)
    bar.close()
    return result
