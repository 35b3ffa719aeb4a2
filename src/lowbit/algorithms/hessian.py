"""Running Hessian H = 2 X Xᵀ / n of a Linear's inputs (the GPTQ proxy for its output error)."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


PIECE_ROWS = 256  # bf16 products over at most this many rows each: rounding noise averages out (fewer Cholesky failures)
F32_PIECE_ROWS = 1024  # float32 products: rows converted from bf16 at a time (a small, reused temporary)
COLUMN_PARTS = 4  # float32 products: only the lower triangle is summed, in this many column blocks (~5/8 of the work)


# Narrower Hessians are accumulated from float32 products: they are cheap, and attention-output
# Hessians (o_proj) are close to singular, where bf16 rounding of the products breaks positive
# definiteness (Cholesky fails, dampening goes up x10 and the layer's error with it).
BF16_MIN_FEATURES = 1024


class HessianAccumulator:
    """Accumulates H = 2/n · Σ x xᵀ over activation rows x [.., in] in float32 (or float64).

    `add` takes any tensor whose last dimension is `in_features` (batch, tokens, ...); every
    row counts as one sample. The raw sum is kept and divided on read, so the order in which
    batches arrive does not change the result beyond float rounding. H is symmetric: it is read
    from the sum's lower triangle, and the float32 path sums only that (`COLUMN_PARTS`).
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, name: str = "layer"):
        self.in_features = int(in_features)
        self.dtype = dtype
        self.name = name
        self._sum = torch.zeros(self.in_features, self.in_features, dtype=dtype)
        self.n = 0
        step = -(-self.in_features // COLUMN_PARTS)
        self._blocks = [(i, min(i + step, self.in_features)) for i in range(0, self.in_features, step)]
        self._scratch: dict = {}

    def _buffer(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, cols] scratch tensor reused across calls: the products run thousands of times
        per model, and fresh few-MiB temporaries each time cost page faults once freed memory
        has been handed back to the OS (`runtime.memory.release_free_memory`)."""
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < rows * cols:
            buf = self._scratch[dtype] = torch.empty(rows * cols, dtype=dtype)
        return buf[: rows * cols].view(rows, cols)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise LowbitError(
                f"{self.name}: activation has {x.shape[-1]} features, the Hessian expects {self.in_features}"
            )
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.dtype == torch.bfloat16 and self.dtype == torch.float32 and self.in_features >= BF16_MIN_FEATURES:
            # bf16 activations: the products run on the bf16 matrix units (~3.5x faster here) and
            # each piece's partial sum is added to the float32 total
            # (full products: column blocks save no time here, the float32 additions dominate)
            for piece in x2.split(PIECE_ROWS):
                self._sum.add_(torch.mm(piece.T, piece, out=self._buffer(self.in_features, self.in_features, x2.dtype)))
        else:
            for piece in x2.split(F32_PIECE_ROWS):
                piece = self._buffer(piece.shape[0], self.in_features, self.dtype).copy_(piece)
                for a, b in self._blocks:
                    self._sum[a:, a:b].addmm_(piece[:, a:].T, piece[:, a:b])
        self.n += x2.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise LowbitError(f"{self.name}: no calibration activations reached this layer; its Hessian is empty")
        lower = self._sum.tril()
        return (lower + lower.tril(-1).T) * (2.0 / self.n)

    def state_dict(self) -> dict:
        return {"sum": self._sum, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self._sum = state["sum"].to(self.dtype)
        self.n = int(state["n"])


def output_error_rows(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: (ΔW H ΔWᵀ)_rr and (W H Wᵀ)_rr, the parts of `output_error`.

    `dtype=torch.bfloat16` runs the two products on the bf16 matrix units (about 3x faster here;
    measured per-row deviation from float32 below 0.1%, for figures that are reported, not
    optimised against)."""
    W, d, H = W.float(), W.float() - Q.float(), H.float()
    both = torch.cat([d, W]).to(dtype) @ H.to(dtype)
    dH, WH = both.float().split(W.shape[0])
    return (dH * d).sum(1), (WH * W).sum(1)


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of replacing W by Q for inputs with Hessian H."""
    num, den = output_error_rows(W, Q, H)
    return float(num.sum() / den.sum().clamp_min(1e-30))
