"""QuantConv2d: a Conv2d with packed quantized weights, run as im2col + QuantLinear.

The weight [Cout, Cin, kh, kw] is the record of a Linear over patches of Cin·kh·kw values
(F.unfold's column order: channel-major, then kernel row, column), so every method, kernel and
writer that takes a Linear's record takes a conv's too; groups of a grouped spec run along that
axis. groups = 1 and zero padding only (other convs stay in float: `quantizable_conv`).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.nn.int8_conv import patches
from lowbit.nn.quant_linear import QuantLinear


def quantizable_conv(conv: nn.Module) -> bool:
    """A Conv2d the patch matmul computes exactly: groups = 1, numeric zero padding."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple))


def conv_weight_2d(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weight as the [Cout, Cin·kh·kw] matrix its patches multiply."""
    return conv.weight.detach().reshape(conv.out_channels, -1)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input x [B, Cin, H, W] as rows of patches [B·Ho·Wo, Cin·kh·kw]."""
    return patches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)[0]


class QuantConv2d(nn.Module):
    """y = conv2d(x, W) + b with W held by a QuantLinear over the input's patches."""

    def __init__(self, inner: QuantLinear, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, name: str = "QuantConv2d"):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.name = in_channels, out_channels, name
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride), pair(padding),
                                                                      pair(dilation))
        if inner.in_features != in_channels * self.kernel_size[0] * self.kernel_size[1]:
            raise LowbitError(f"{name}: the quantized weight has {inner.in_features} inputs, the conv's patches "
                              f"{in_channels}x{self.kernel_size[0]}x{self.kernel_size[1]}")
        self.inner = inner

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, conv: nn.Conv2d, name: str = "QuantConv2d",
                       kernel: str | None = None) -> "QuantConv2d":
        """From a record of the conv's [Cout, Cin·kh·kw] weight; `conv` gives the geometry and bias."""
        if not quantizable_conv(conv):
            raise LowbitError(f"{name}: only groups=1 convolutions with zero padding run quantized "
                              f"(got groups={conv.groups}, padding={conv.padding!r}, mode={conv.padding_mode})")
        bias = None if conv.bias is None else conv.bias.detach()
        inner = QuantLinear.from_quantized(qw, bias, name=name, kernel=kernel)
        return cls(inner, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, name=name)

    @property
    def spec(self):
        return self.inner.spec

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dequantized weight [Cout, Cin, kh, kw]."""
        return self.inner.dense_weight(dtype).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise LowbitError(f"{self.name}: input has shape {tuple(x.shape)}, the conv takes "
                              f"[batch, {self.in_channels}, H, W]")
        cols, ho, wo = patches(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = self.inner(cols)
        return y.reshape(x.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def nbytes(self, include_bias: bool = False) -> int:
        return self.inner.nbytes(include_bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, spec={self.spec.describe()}")
