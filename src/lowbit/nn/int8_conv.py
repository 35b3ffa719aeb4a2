"""Int8Conv2d: a Conv2d run as im2col (`patches`) + the Int8Linear kernel over the patches.

The weight [Cout, Cin, kh, kw] is a Linear over patches of Cin·kh·kw values (unfold's order:
channel-major, then kernel row, column); dynamic inputs get one scale per patch (the conv's
"token"), static per-channel input scales are one per input channel, repeated over its kh·kw
patch positions. groups = 1 only (a grouped or depthwise conv stays in float: `prepare` skips it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.nn.int8_linear import Int8Linear
from lowbit.spec import LayerScheme


def expand_channel_params(t, kernel_area: int):
    """A per-input-channel scale / zero [C] -> per patch column [C·kh·kw] (scalars unchanged)."""
    if t is None:
        return None
    t = torch.as_tensor(t, dtype=torch.float32)
    return t.reshape(-1).repeat_interleave(kernel_area) if t.dim() > 0 else t


def patches(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """x [B, C, H, W] -> [B·Ho·Wo, C·kh·kw] in F.unfold's column order, by kh·kw strided slices of the
    padded input (torch's CPU im2col loops over the batch and is ~50x slower here for small C)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xl = x.permute(0, 2, 3, 1)  # channels last: each slice is [B, Ho, Wo, C]
    cols = [xl[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw, :]
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, dim=-1).reshape(b * ho * wo, c * kh * kw), ho, wo


class Int8Conv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 scheme: LayerScheme | None = None, bias: bool = True, name: str = "Int8Conv2d"):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.name = in_channels, out_channels, name
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride), pair(padding),
                                                                      pair(dilation))
        area = self.kernel_size[0] * self.kernel_size[1]
        self.inner = Int8Linear(in_channels * area, out_channels, scheme, bias=bias, name=name)
        if scheme.input is not None and scheme.input.granularity == "channel":  # one scale per input channel
            self.inner.input_scale = torch.ones(in_channels * area)
            if self.inner.input_zero is not None:
                self.inner.input_zero = torch.zeros(in_channels * area)

    @property
    def scheme(self) -> LayerScheme:
        return self.inner.scheme

    @classmethod
    def from_float(cls, conv: nn.Conv2d, scheme: LayerScheme, input_qparams=None, output_qparams=None,
                   name: str = "Int8Conv2d") -> "Int8Conv2d":
        if conv.groups != 1 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise LowbitError(f"{name}: only groups=1 convolutions with numeric zero padding run in int8")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                scheme=scheme, bias=conv.bias is not None, name=name)
        area = m.kernel_size[0] * m.kernel_size[1]
        lin = nn.Linear(conv.in_channels * area, conv.out_channels, bias=conv.bias is not None)
        lin.weight.data = conv.weight.detach().float().reshape(conv.out_channels, -1)
        if conv.bias is not None:
            lin.bias.data = conv.bias.detach().float()
        if input_qparams is not None:
            input_qparams = tuple(expand_channel_params(t, area) for t in input_qparams)
        m.inner = Int8Linear.from_float(lin, scheme, input_qparams, output_qparams, name=name)
        return m

    def record(self) -> QuantizedWeight:
        return self.inner.record()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise LowbitError(f"{self.name}: input has shape {tuple(x.shape)}, the conv takes "
                              f"[batch, {self.in_channels}, H, W]")
        b = x.shape[0]
        cols, ho, wo = patches(x.float(), self.kernel_size, self.stride, self.padding, self.dilation)
        y = self.inner.linear2d(cols)
        return y.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
