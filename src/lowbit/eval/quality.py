"""Perplexity of both models and KL divergence / top-1 agreement of the quantized one to the original."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def logprob_stats(ref_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over positions predicting `targets`, from log-probabilities: NLL of both,
    KL(ref || q), top-1 matches."""
    nll_ref = -ref_lp.gather(-1, targets[..., None]).sum().item()
    nll = -lp.gather(-1, targets[..., None]).sum().item()
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).sum().item()
    top1 = (ref_lp.argmax(-1) == lp.argmax(-1)).sum().item()
    return {"nll_ref": nll_ref, "nll": nll, "kl": kl, "top1": top1, "n": targets.numel()}


def token_stats(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """logprob_stats from raw logits."""
    return logprob_stats(F.log_softmax(ref_logits, dim=-1), F.log_softmax(logits, dim=-1), targets)


@torch.no_grad()
def quality_many(original, models: dict, windows: torch.Tensor, progress: bool = True) -> tuple[dict, dict]:
    """Like quality_pair for several quantized models at once: the original runs once per window."""
    tots = {k: {"nll_ref": 0.0, "nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for k in models}
    for ids in tqdm(windows, desc="evaluating", disable=not progress, unit="window"):
        ids = ids[None]
        ref_lp = F.log_softmax(_logits(original, ids)[:, :-1], dim=-1)
        for k, model in models.items():
            s = logprob_stats(ref_lp, F.log_softmax(_logits(model, ids)[:, :-1], dim=-1), ids[:, 1:])
            for key in tots[k]:
                tots[k][key] += s[key]
    any_tot = next(iter(tots.values()))
    n = any_tot["n"]
    orig = {"perplexity": math.exp(any_tot["nll_ref"] / n), "kl": 0.0, "top1_agreement": 1.0, "eval_tokens": n}
    results = {k: {"perplexity": math.exp(t["nll"] / n), "kl": t["kl"] / n, "top1_agreement": t["top1"] / n,
                   "eval_tokens": n} for k, t in tots.items()}
    return orig, results


def quality_pair(original, quantized, windows: torch.Tensor, progress: bool = True) -> tuple[dict, dict]:
    """Metrics of the original and the quantized model over [n, seq] evaluation windows."""
    orig, results = quality_many(original, {"q": quantized}, windows, progress)
    return orig, results["q"]
