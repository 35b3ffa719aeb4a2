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
        self._H: torch.Tensor | None = None  # H, built in the sum's memory on first read
        self.n = 0
        step = -(-self.in_features // COLUMN_PARTS)
        self._blocks = [(i, min(i + step, self.in_features)) for i in range(0, self.in_features, step)]

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise LowbitError(
                f"{self.name}: activation has {x.shape[-1]} features, the Hessian expects {self.in_features}"
            )
        x2 = x.detach().reshape(-1, self.in_features)
        d = self.in_features
        if self._H is not None:  # more data after H was read: back to the running lower-triangle sum
            self._sum, self._H = self._H.tril() * (self.n / 2.0), None
        # one scratch tensor per call, reused by all its pieces (fresh temporaries per piece cost
        # page faults once freed memory has been handed back to the OS)
        if x2.dtype == torch.bfloat16 and self.dtype == torch.float32 and d >= BF16_MIN_FEATURES:
            # bf16 activations: the products run on the bf16 matrix units (~3.5x faster here) and
            # each piece's partial sum is added to the float32 total (full products: column
            # blocks save no time here, the float32 additions dominate)
            prod = torch.empty(d, d, dtype=x2.dtype)
            for piece in x2.split(PIECE_ROWS):
                self._sum.add_(torch.mm(piece.T, piece, out=prod))
        else:
            buf = torch.empty(min(F32_PIECE_ROWS, x2.shape[0]), d, dtype=self.dtype)
            for piece in x2.split(F32_PIECE_ROWS):
                piece = buf[: piece.shape[0]].copy_(piece)
                for a, b in self._blocks:
                    self._sum[a:, a:b].addmm_(piece[:, a:].T, piece[:, a:b])
        self.n += x2.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise LowbitError(f"{self.name}: no calibration activations reached this layer; its Hessian is empty")
        if self._H is None:  # in place: for a 1536-wide layer the sum and a copy are 9 MiB each
            H = self._sum.tril_()
            H += H.tril(-1).T
            self._H, self._sum = H.mul_(2.0 / self.n), None
        return self._H

    def state_dict(self) -> dict:
        raw = self._sum.clone() if self._H is None else self._H.tril() * (self.n / 2.0)
        return {"sum": raw, "n": self.n}  # a snapshot: reading H later works in the sum's memory

    def load_state_dict(self, state: dict) -> None:
        self._sum, self._H = state["sum"].to(self.dtype, copy=True), None
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
