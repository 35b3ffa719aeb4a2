"""Perplexity of both models and KL divergence / top-1 agreement of the quantized one to the original."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.kl_stats import token_kl

POSITIONS = 128  # positions per piece of the log-softmax / KL arithmetic


def _logits(model, ids: torch.Tensor, label: str = "the model", window: int = 0) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise LowbitError(f"{label} gives NaN/Inf logits on evaluation window {window}; its perplexity would be "
                          "meaningless: check that model's weights (re-quantize or re-export it)")
    return logits


def logprob_stats(ref_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over positions predicting `targets`, from log-probabilities: NLL of both,
    KL(ref || q), top-1 matches."""
    nll_ref = -ref_lp.gather(-1, targets[..., None]).sum().item()
    nll = -lp.gather(-1, targets[..., None]).sum().item()
    kl = token_kl(ref_lp, lp).sum().item()
    top1 = (ref_lp.argmax(-1) == lp.argmax(-1)).sum().item()
    return {"nll_ref": nll_ref, "nll": nll, "kl": kl, "top1": top1, "n": targets.numel()}


@torch.no_grad()
def quality_many(original, models: dict, windows: torch.Tensor, progress: bool = True,
                 labels: dict | None = None, kl_values: bool = False) -> tuple[dict, dict]:
    """Like quality_pair for several quantized models at once: the original runs once per window.
    Non-finite logits are an error naming the model (`labels`: {key or "original": name}).
    kl_values=True adds each model's per-token KL (a float32 tensor, window-major) as "kl_values"."""
    labels = labels or {}
    if windows.shape[0] == 0 or windows.shape[-1] < 2:
        raise LowbitError(f"evaluation needs at least one window of 2 or more tokens; got {tuple(windows.shape)}")
    tots = {k: {"nll_ref": 0.0, "nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for k in models}
    per_token: dict = {k: [] for k in models}
    for w, ids in enumerate(tqdm(windows, desc="evaluating", disable=not progress, unit="window")):
        ids = ids[None]
        logits = _logits(original, ids, labels.get("original", "the original model"), w)
        ref_lp = F.log_softmax(logits[:, :-1], dim=-1)
        del logits
        for k, model in models.items():
            logits = _logits(model, ids, labels.get(k, f"the quantized model {k!r}"), w)[:, :-1]
            # in pieces of positions: the temporaries of a [seq, vocab] log-softmax and KL are
            # 100 MiB each for SmolLM2 at 512 tokens, a piece's 25 MiB
            for start in range(0, logits.shape[1], POSITIONS):
                piece = slice(start, start + POSITIONS)
                lp = F.log_softmax(logits[:, piece], dim=-1)
                s = logprob_stats(ref_lp[:, piece], lp, ids[:, 1:][:, piece])
                if kl_values:
                    per_token[k].append(token_kl(ref_lp[:, piece], lp).flatten().float())
                del lp
                for key in tots[k]:
                    tots[k][key] += s[key]
            del logits
    any_tot = next(iter(tots.values()))
    n = any_tot["n"]
    orig = {"perplexity": math.exp(any_tot["nll_ref"] / n), "kl": 0.0, "top1_agreement": 1.0, "eval_tokens": n}
    results = {k: {"perplexity": math.exp(t["nll"] / n), "kl": t["kl"] / n, "top1_agreement": t["top1"] / n,
                   "eval_tokens": n} for k, t in tots.items()}
    if kl_values:
        for k in results:
            results[k]["kl_values"] = torch.cat(per_token[k])
    return orig, results


def quality_pair(original, quantized, windows: torch.Tensor, progress: bool = True,
                 labels: tuple[str, str] = ("the original model", "the quantized model")) -> tuple[dict, dict]:
    """Metrics of the original and the quantized model over [n, seq] evaluation windows."""
    orig, results = quality_many(original, {"q": quantized}, windows, progress,
                                 labels={"original": labels[0], "q": labels[1]})
    return orig, results["q"]
