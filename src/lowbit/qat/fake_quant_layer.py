"""FakeQuantLayer: a Linear or Conv2d training with fake-quantized weights (and inputs).

The float weight is a Parameter; the weight grid is learned (LSQ scale, optional LSQ+ zero point)
or recomputed by min-max every step. A conv runs as patches x weight matrix, the way QuantConv2d
and Int8Conv2d run it, so `record()` and the converted module see exactly this arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.fake_quant import (activation_codes, fake_quantize_grouped, fake_quantize_learned, learned_codes,
                                    stored_qparams)
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.nn.int8_conv import patches
from lowbit.nn.quant_linear import regular_perm
from lowbit.spec import LayerScheme


class FakeQuantLayer(nn.Module):
    def __init__(self, module: nn.Module, scheme: LayerScheme, name: str, weight_range: str = "lsq",
                 learn_zero: bool = False, record: QuantizedWeight | None = None):
        super().__init__()
        self.scheme, self.name, self.weight_range = scheme, name, weight_range
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            self.in_channels, self.out_channels = module.in_channels, module.out_channels
            self.geometry = (module.kernel_size, module.stride, module.padding, module.dilation)
        self.in_features = module.weight[0].numel()
        self.out_features = module.weight.shape[0]
        spec = scheme.weight
        spec.check_shape(self.out_features, self.in_features, name)
        w = module.weight.detach().float()
        self.register_buffer("g_idx", None)  # act-order groups no column permutation makes contiguous
        self.register_buffer("perm", None)  # act-order made contiguous: weight columns held in this order
        self.register_buffer("saved_g_idx", None)
        if record is not None:
            if record.spec != spec:
                raise LowbitError(f"{name}: the PTQ record is {record.spec.describe()}, the QAT scheme "
                                  f"{spec.describe()}; quantize with the same spec")
            if record.shape != (self.out_features, self.in_features):
                raise LowbitError(f"{name}: the PTQ record has shape {record.shape}, the layer "
                                  f"{(self.out_features, self.in_features)}")
            w = record.dequantize(torch.float32).reshape(module.weight.shape)  # the PTQ weights, exactly
            scale, zero = record.scale.float(), None if record.zero is None else record.zero.float()
            if record.g_idx is not None:
                perm = regular_perm(record.g_idx, spec.group_size if spec.granularity == "group" else None)
                if perm is None:
                    self.g_idx = record.g_idx.detach().clone()
                else:
                    self.perm, self.saved_g_idx = perm, record.g_idx.detach().clone()
                    w = w.reshape(self.out_features, -1)[:, perm]
        else:
            scale, zero = choose_qparams(w.reshape(self.out_features, -1), spec)
        self.weight = nn.Parameter(w.clone().contiguous())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float().clone())
        learned = weight_range == "lsq"
        self.weight_scale = nn.Parameter(scale.clone(), requires_grad=learned) if learned else None
        self.weight_zero = None
        self._learn_zero = learned and learn_zero and zero is not None
        self._learn_input = False
        self.held_codes = False  # scale / zero gradients with the codes held (see fake_quantize_grouped)
        if learned and zero is not None:
            self.weight_zero = nn.Parameter(zero.clone(), requires_grad=learn_zero)
        a = scheme.input
        static = a is not None and not a.dynamic
        self.input_scale = nn.Parameter(torch.ones(())) if static else None
        self.register_buffer("input_zero", torch.zeros(()) if static and not a.symmetric else None)

    # ---- weights ------------------------------------------------------------------------
    def _qparams(self):
        spec = self.scheme.weight
        if self.weight_range == "minmax":
            s, z = choose_qparams(self.weight.detach().reshape(self.out_features, -1), spec)
            return s, z
        return stored_qparams(self.weight_scale, self.weight_zero, spec)

    def fake_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake-quantized weight [out, in], its integer codes), columns in `perm` order if set."""
        s, z = self._qparams()
        w2 = self.weight.reshape(self.out_features, -1)
        if self.g_idx is None:
            return fake_quantize_grouped(w2, s, z, self.scheme.weight, self.held_codes)
        return fake_quantize_learned(w2, s, z, self.scheme.weight, self.g_idx)

    def record(self) -> QuantizedWeight:
        """The quantized-layer record of the current weights: the codes the forward uses, exactly
        (in the layer's column order, with the PTQ record's g_idx when it had one)."""
        with torch.no_grad():
            s, z = self._qparams()
            _, q = self.fake_weight()
            spec = self.scheme.weight
            codes = q.to(torch.int8 if spec.symmetric else torch.uint8)
            g_idx = self.g_idx
            if self.perm is not None:
                codes = torch.empty_like(codes).index_copy_(1, self.perm, codes)
                g_idx = self.saved_g_idx
            return QuantizedWeight(codes, s.detach().clone(), None if z is None else z.detach().clone(), spec,
                                   None if g_idx is None else g_idx.clone())

    def set_input_range(self, scale: torch.Tensor, zero: torch.Tensor | None, learn: bool) -> None:
        self.input_scale.data = torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone()
        self.input_scale.requires_grad_(learn)
        self._learn_input = learn
        if self.input_zero is not None:
            self.input_zero = torch.as_tensor(zero, dtype=torch.float32).reshape(()).clone()

    def input_qparams(self):
        if self.input_scale is None:
            return None, None
        return self.input_scale.detach().abs().clamp_min(1e-12), self.input_zero

    # ---- compute ------------------------------------------------------------------------
    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] -> [rows, out] float32. With an activation spec, in the int8 kernel's
        order of operations (integer-valued codes multiplied exactly, then x row scale, x weight
        scale, + bias), so the converted Int8Linear gives the same numbers."""
        a = self.scheme.input
        if a is None:
            w, _ = self.fake_weight()
            if self.perm is not None:
                x2 = x2.index_select(1, self.perm)
            return F.linear(x2, w, self.bias)
        s, z = self._qparams()
        qw, _, _ = learned_codes(self.weight.reshape(self.out_features, -1), s, z, self.scheme.weight, self.g_idx)
        w_scale = s.reshape(-1)
        if a.dynamic:
            qx, row_scale = activation_codes(x2, a)
            y = F.linear(qx, qw) * row_scale * w_scale
        else:
            scale = self.input_scale.abs().clamp_min(1e-12)
            qx, _ = activation_codes(x2, a, scale, self.input_zero)
            y = F.linear(qx, qw) * (w_scale * scale)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise LowbitError(f"{self.name}: input has shape {tuple(x.shape)}, the conv takes "
                                  f"[batch, {self.in_channels}, H, W]")
            cols, ho, wo = patches(x.float(), *self.geometry)
            y = self._matmul(cols)
            return y.reshape(x.shape[0], ho, wo, self.out_features).permute(0, 3, 1, 2).to(x.dtype)
        if x.shape[-1] != self.in_features:
            raise LowbitError(f"{self.name}: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        y = self._matmul(x.reshape(-1, self.in_features).float())
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        return f"{kind} {self.in_features}->{self.out_features}, {self.scheme.describe()}, weight {self.weight_range}"
