"""The fine-tuning loop: AdamW on the adapters only, causal-LM loss, held-out evaluation,
checkpoints every `save_every` steps, resume, determinism.

Deterministic with a seed, across a kill and resume too: the batch of step s and the dropout masks
of step s are drawn from generators seeded by (seed, s), the learning rate is a function of s, and
the optimizer state is checkpointed, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.qlora import checkpoint
from lowbit.qlora.adapt import Adapted
from lowbit.qlora.data import IGNORE, Examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 25
    eval_batch: int = 4

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch"):
            if getattr(self, name) < 1:
                raise LowbitError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise LowbitError(f"--lr must be positive; got {self.lr}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_indices(cfg: TrainConfig, step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, n, (cfg.batch_size,), generator=g)


@torch.no_grad()
def perplexity(model, data: Examples, batch: int = 4) -> float:
    """exp(mean next-token NLL) over the examples' labelled tokens."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids, labels = data.ids[i: i + batch], data.labels[i: i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((tgt != IGNORE).sum())
    model.train(was)
    return math.exp(total / max(1, count))


def train(adapted: Adapted, train_data: Examples, eval_data: Examples | None, out: str | Path,
          cfg: TrainConfig = TrainConfig(), resume: bool = True, until: int | None = None) -> dict:
    """Train the adapters of `adapted` on `train_data`; checkpoints in OUT/checkpoint. `until` stops
    after that many steps (the schedule still spans cfg.steps; a later call continues). Returns metrics:
    final_loss, eval_ppl, tokens_per_s (training tokens incl. forward+backward), steps, resumed_from."""
    out = Path(out)
    if len(train_data) == 0:
        raise LowbitError("the training data holds no examples")
    model = adapted.model
    params = adapted.trainable()
    if not params:
        raise LowbitError("the model has no trainable adapters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    state = checkpoint.load(out, adapted, opt) if resume else None
    start, losses = (state["step"], state.get("losses", [])) if state else (0, [])
    if state:
        log.info("resuming from %s at step %d", out / checkpoint.FOLDER, start)
    model.train()
    tokens, seconds = 0, 0.0
    end = cfg.steps if until is None else min(until, cfg.steps)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="fine-tune", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        idx = batch_indices(cfg, step, len(train_data))
        ids, labels = train_data.ids[idx], train_data.labels[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks of this step
        loss = model(input_ids=ids, labels=labels).loss
        if not torch.isfinite(loss):
            raise LowbitError(f"the loss became {float(loss)} at step {step}; lower --lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += ids.numel()
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / seconds:.0f}")
        done = step + 1
        if done % cfg.save_every == 0 or done == end:
            checkpoint.save(out, adapted, opt, {"step": done, "losses": losses, "train": asdict(cfg),
                                                "base": adapted.base_name})
    bar.close()
    metrics = {"steps": end, "resumed_from": start, "final_loss": losses[-1] if losses else None,
               "losses": losses, "tokens_per_s": tokens / seconds if seconds else None}
    if eval_data is not None and len(eval_data):
        metrics["eval_ppl"] = perplexity(model, eval_data, cfg.eval_batch)
    return metrics
