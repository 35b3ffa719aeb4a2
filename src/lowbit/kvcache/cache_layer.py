"""One decoder layer of the quantized KV cache (a transformers ``DynamicLayer``)."""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import LowbitError
from .key_frame import KeyFrame, RopeTable, fit_key_frame
from .packed import Packed
from .token_buffer import TokenBuffer

__all__ = ["QuantizedKVLayer", "QuantizedSlidingKVLayer", "MIN_SCALE_TOKENS"]

#: fewer tokens than this at the first flush give too noisy a per-channel variance: no key scales then
MIN_SCALE_TOKENS = 16


class QuantizedKVLayer(DynamicLayer):
    """Keys/values are quantized as they arrive; the newest ``window`` tokens stay in full precision.

    ``self.keys`` / ``self.values`` hold the full-precision tail (window plus tokens waiting for a
    complete KIVI group); the first ``sink`` tokens stay in full precision; everything else lives only
    as :class:`Packed` bytes, keys in the :class:`KeyFrame` fitted at the first flush, values minus
    their mean.  Every ``update`` returns ``sink ++ dequantize(packed) ++ tail`` — attention always
    reads the quantized cache, also during prefill, so a single forward pass measures what decoding
    would see.  With ``decode_buffer`` that sequence is kept in a :class:`TokenBuffer` and only the
    newly packed tokens are dequantized (into place).
    """

    is_croppable = False

    def __init__(self, make_quantizers, window: int = 0, calibrate_outliers: bool = True, center: bool = True,
                 sink: int = 0, inv_freq: torch.Tensor | None = None, key_scale_power: float = 0.0,
                 decode_buffer: bool = False, key_basis: torch.Tensor | None = None, score_codes: bool = False,
                 rope_table: RopeTable | None = None):
        super().__init__()
        if not isinstance(window, int) or window < 0:
            raise LowbitError(f"window must be a non-negative integer, got window={window!r}")
        if not isinstance(sink, int) or sink < 0:
            raise LowbitError(f"sink must be a non-negative integer, got sink={sink!r}")
        self.sink = sink
        self._sk = self._sv = None  # the first `sink` tokens (attention sinks), kept in full precision
        self._make_quantizers = make_quantizers
        self.window = window
        self.calibrate_outliers = calibrate_outliers
        self.center = center
        self.inv_freq, self.key_scale_power = inv_freq, float(key_scale_power)
        self.decode_buffer, self.key_basis = decode_buffer, key_basis
        self.score_codes, self.rope_table = score_codes, rope_table
        self._frame: KeyFrame | None = None  # keys: RoPE undone, mean removed, channels rescaled
        self._mv = None  # values: per-head channel mean (fp16), subtracted before quantizing
        self._next_pos = 0  # cache index of the first full-precision tail token
        self._bk = self._bv = None  # decode buffer: what attention reads, packed tokens dequantized once
        self.cumulative_length = 0
        self.key_quantizer = self.value_quantizer = None
        self._pk: Packed | None = None
        self._pv: Packed | None = None

    # -- state -----------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        if self.key_quantizer is None:
            self.key_quantizer, self.value_quantizer = self._make_quantizers(key_states.shape[-1], value_states.shape[-1])
        kb, vb = self.key_quantizer.token_block, self.value_quantizer.token_block
        self.block = kb * vb // math.gcd(kb, vb)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    @property
    def quantized_length(self) -> int:
        return 0 if self._pk is None else self._pk.shape[-2]

    def reset(self) -> None:
        super().reset()
        self._pk = self._pv = self._frame = self._mv = self._sk = self._sv = self._bk = self._bv = None
        self._next_pos = 0

    # -- the hot path ----------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.decode_buffer:
            if self._bk is None:
                self._bk, self._bv = TokenBuffer(), TokenBuffer()
            self._bk.append(key_states)
            self._bv.append(value_states)
        self._flush()
        if self._bk is not None:
            return self._bk.view(), self._bv.view()
        if self.score_codes and key_states.shape[-2] == 1 and self._pk is not None:
            # a decode step: attention scores the stored codes (code_scoring.code_attention reads this layer)
            mk, mv = key_states.new_empty(0), value_states.new_empty(0)
            mk._lowbit_layer = self
            return mk, mv
        return self._read()

    def _packed_positions(self) -> torch.Tensor:
        n = self.quantized_length
        return torch.arange(self._next_pos - n, self._next_pos, device=self.keys.device)

    def _flush(self) -> None:
        have = 0 if self._sk is None else self._sk.shape[-2]
        if have < self.sink:
            take = min(self.sink - have, self.keys.shape[-2])
            k, v = self.keys[..., :take, :], self.values[..., :take, :]
            self._sk = k if self._sk is None else torch.cat([self._sk, k], dim=-2)
            self._sv = v if self._sv is None else torch.cat([self._sv, v], dim=-2)
            self.keys, self.values = self.keys[..., take:, :], self.values[..., take:, :]
            self._next_pos += take
        n_move = self.keys.shape[-2] - self.window
        n_move -= n_move % self.block
        if n_move <= 0:
            return
        if self._pk is None:
            # fitted once, on every token held so far (window included): softmax(q·k) ignores a shift shared
            # by all keys and Σ p v moves by the value shift, but both are added back exactly anyway
            n = self.keys.shape[-2]
            power = self.key_scale_power if n >= MIN_SCALE_TOKENS else 0.0
            self._frame = fit_key_frame(self.keys, torch.arange(self._next_pos, self._next_pos + n,
                                                                device=self.keys.device),
                                        self.inv_freq, self.center, power, self.key_basis,
                                        post_rope=self.score_codes, table=self.rope_table)
            if self.center:
                self._mv = self.values.float().mean(-2, keepdim=True).half()
        k, v = self.keys[..., :n_move, :], self.values[..., :n_move, :]
        pos = torch.arange(self._next_pos, self._next_pos + n_move, device=k.device)
        k = self._frame.to_frame(k, pos)
        v = v.float() - self._mv.float() if self._mv is not None else v
        if self._pk is None and self.calibrate_outliers:
            # fractional bits: the first tokens decide which channels get the extra bit
            if hasattr(self.key_quantizer, "with_outliers_from"):
                self.key_quantizer = self.key_quantizer.with_outliers_from(
                    _pair_energy(k, self.inv_freq) if self._frame.post_rope else k)
            if hasattr(self.value_quantizer, "with_outliers_from"):
                self.value_quantizer = self.value_quantizer.with_outliers_from(v)
        pk, pv = self.key_quantizer.quantize(k), self.value_quantizer.quantize(v)
        if self._bk is not None:  # overwrite the moved tokens' full-precision copies with what was stored
            at = (0 if self._sk is None else self._sk.shape[-2]) + self.quantized_length
            dk, dv = self._dequantize(pk, pv, pos)
            self._bk.write(at, dk)
            self._bv.write(at, dv)
        self._pk = pk if self._pk is None else self._pk.cat(pk)
        self._pv = pv if self._pv is None else self._pv.cat(pv)
        self.keys, self.values = self.keys[..., n_move:, :], self.values[..., n_move:, :]
        self._next_pos += n_move

    def _dequantize(self, pk: Packed, pv: Packed, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dk = self._frame.from_frame(self.key_quantizer.dequantize(pk), pos).to(self.dtype)
        dv = self.value_quantizer.dequantize(pv)
        if self._mv is not None:
            dv = dv + self._mv.float()
        return dk, dv.to(self.dtype)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._read_body()
        if self._sk is None:
            return keys, values
        return torch.cat([self._sk, keys], dim=-2), torch.cat([self._sv, values], dim=-2)

    def _read_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pk is None:
            return self.keys, self.values
        dk, dv = self._dequantize(self._pk, self._pv, self._packed_positions())
        return torch.cat([dk, self.keys], dim=-2), torch.cat([dv, self.values], dim=-2)

    # -- bookkeeping -----------------------------------------------------------------------------
    def storage(self) -> dict:
        """Bytes held (packed + full-precision tail counted at 16 bits) and the fp16 equivalent."""
        packed = 0 if self._pk is None else self._pk.nbytes + self._pv.nbytes
        if self._frame is not None:
            packed += self._frame.nbytes
        if self._mv is not None:
            packed += 2 * self._mv.numel()
        tail = 2 * (self.keys.numel() + self.values.numel()) if self.is_initialized else 0
        if self._sk is not None:
            tail += 2 * (self._sk.numel() + self._sv.numel())
        coords = (self._pk.numel + self._pv.numel if self._pk is not None else 0) + tail // 2
        buf = sum(b.nbytes for b in (self._bk, self._bv) if b is not None)
        return {"bytes": packed + tail, "fp16_bytes": 2 * coords, "coords": coords, "decode_buffer_bytes": buf}

    def _map_batch(self, fn) -> None:
        if self._pk is not None:
            self._pk, self._pv = self._pk.index_select(0, fn), self._pv.index_select(0, fn)
        if self._sk is not None:
            self._sk = self._sk.index_select(0, fn.to(self._sk.device))
            self._sv = self._sv.index_select(0, fn.to(self._sv.device))
        if self._frame is not None:
            self._frame = self._frame.index_select(fn)
        if self._mv is not None:
            self._mv = self._mv.index_select(0, fn.to(self._mv.device))
        if self._bk is not None:
            self._bk.index_select(fn)
            self._bv.index_select(fn)
        if self.is_initialized:
            self.keys = self.keys.index_select(0, fn.to(self.keys.device))
            self.values = self.values.index_select(0, fn.to(self.values.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        self._map_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._map_batch(torch.arange(b, device=self.keys.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise LowbitError("crop expects a negative number of tokens to remove, as DynamicLayer.crop")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        tail = self.keys.shape[-2]
        if n > tail:
            cut = n - tail
            if self._pk is None or cut > self.quantized_length:
                raise LowbitError(f"cannot crop {n} tokens: that reaches the full-precision attention sinks")
            if cut % self.block:
                raise LowbitError(f"cannot crop {n} tokens: the quantized part is stored in groups of {self.block}")
            self._pk, self._pv = self._pk.drop_back(cut), self._pv.drop_back(cut)
            self._next_pos -= cut
            n = tail
        self.keys, self.values = self.keys[..., : tail - n, :], self.values[..., : tail - n, :]
        if self._bk is not None:
            self._bk.drop_back(-tokens_to_remove)
            self._bv.drop_back(-tokens_to_remove)
        self.cumulative_length -= -tokens_to_remove


def _pair_energy(k: torch.Tensor, inv_freq: torch.Tensor | None) -> torch.Tensor:
    """Keys with each RoPE pair's channels given their pair's rms and a rank tie-break, so that the outlier
    channels of a fractional-bit split come in whole pairs (a pair's energy does not rotate with RoPE)."""
    if inv_freq is None:
        return k
    half = inv_freq.numel()
    e = k.float().reshape(-1, k.shape[-1]).pow(2).mean(0)
    pair = (e[:half] + e[half:2 * half]) / 2
    pair = pair * (1 + 1e-6 * torch.argsort(torch.argsort(pair)).float() / half)  # distinct across pairs
    e = torch.cat([pair, pair, e[2 * half:]])
    return e.sqrt()[None, :]


class QuantizedSlidingKVLayer(QuantizedKVLayer):
    """Sliding-window attention layer (Gemma 3 local layers): also forgets tokens out of the window."""

    is_sliding = True

    def __init__(self, make_quantizers, sliding_window: int, window: int = 0, calibrate_outliers: bool = True,
                 center: bool = True, inv_freq: torch.Tensor | None = None, key_scale_power: float = 0.0,
                 decode_buffer: bool = False, key_basis: torch.Tensor | None = None, score_codes: bool = False,
                 rope_table: RopeTable | None = None):
        super().__init__(make_quantizers, window, calibrate_outliers, center, 0, inv_freq, key_scale_power,
                         decode_buffer, key_basis, score_codes, rope_table)
        self.sliding_window = sliding_window
        self._sliding_window_tensor = torch.tensor(sliding_window, dtype=torch.long)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        visible = self.sliding_window - 1 + key_states.shape[-2]
        self._visible = visible
        # forget whole packed blocks that no future query can see
        keep = self.sliding_window - (0 if self.score_codes else 1)  # scoring codes reads the state after this
        excess = self.quantized_length + self.keys.shape[-2] - keep
        excess = min(excess, self.quantized_length)
        excess -= excess % self.block
        if excess > 0:
            self._pk, self._pv = self._pk.drop_front(excess), self._pv.drop_front(excess)
            if self._bk is not None:
                self._bk.drop_front(excess)
                self._bv.drop_front(excess)
        if keys.numel() == 0 and getattr(keys, "_lowbit_layer", None) is not None:
            return keys, values  # scored against the codes: code_attention keeps the last `visible` tokens
        return keys[..., -visible:, :], values[..., -visible:, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window
