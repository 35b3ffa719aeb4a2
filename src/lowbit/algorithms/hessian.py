"""Running Hessian H = 2 X Xᵀ / n of a Linear's inputs (the GPTQ proxy for its output error)."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


PIECE_ROWS = 256  # bf16 products over at most this many rows each: rounding noise averages out (fewer Cholesky failures)


# Narrower Hessians are accumulated from float32 products: they are cheap, and attention-output
# Hessians (o_proj) are close to singular, where bf16 rounding of the products breaks positive
# definiteness (Cholesky fails, dampening goes up x10 and the layer's error with it).
BF16_MIN_FEATURES = 1024


class HessianAccumulator:
    """Accumulates H = 2/n · Σ x xᵀ over activation rows x [.., in] in float32 (or float64).

    `add` takes any tensor whose last dimension is `in_features` (batch, tokens, ...); every
    row counts as one sample. The raw sum is kept and divided on read, so the order in which
    batches arrive does not change the result beyond float rounding.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, name: str = "layer"):
        self.in_features = int(in_features)
        self.dtype = dtype
        self.name = name
        self._sum = torch.zeros(self.in_features, self.in_features, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise LowbitError(
                f"{self.name}: activation has {x.shape[-1]} features, the Hessian expects {self.in_features}"
            )
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.dtype == torch.bfloat16 and self.dtype == torch.float32 and self.in_features >= BF16_MIN_FEATURES:
            # bf16 activations: the product runs on the bf16 matrix units (~3.5x faster here) and
            # each chunk's partial sum is added to the float32 total
            for piece in x2.split(PIECE_ROWS):
                self._sum.add_(piece.T @ piece)
        else:
            x2 = x2.to(self.dtype)
            self._sum.addmm_(x2.T, x2)
        self.n += x2.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise LowbitError(f"{self.name}: no calibration activations reached this layer; its Hessian is empty")
        return self._sum * (2.0 / self.n)

    def state_dict(self) -> dict:
        return {"sum": self._sum, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self._sum = state["sum"].to(self.dtype)
        self.n = int(state["n"])


def output_error_rows(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: (ΔW H ΔWᵀ)_rr and (W H Wᵀ)_rr, the parts of `output_error`."""
    d = (W.float() - Q.float())
    H = H.float()
    return ((d @ H) * d).sum(1), ((W.float() @ H) * W.float()).sum(1)


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of replacing W by Q for inputs with Hessian H."""
    num, den = output_error_rows(W, Q, H)
    return float(num.sum() / den.sum().clamp_min(1e-30))
