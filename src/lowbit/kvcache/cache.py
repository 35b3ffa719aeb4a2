"""``QuantizedKVCache``: a transformers ``Cache`` whose layers store TurboQuant / PolarQuant / QJL / KIVI codes."""

from __future__ import annotations

import functools
import logging

from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from ..errors import LowbitError
from .cache_layer import QuantizedKVLayer, QuantizedSlidingKVLayer
from .key_frame import RopeTable, rope_inv_freq
from .methods import METHODS, make_kv_quantizers

__all__ = ["QuantizedKVCache", "SUPPORTED_LAYER_TYPES"]

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class QuantizedKVCache(Cache):
    """A KV cache that keeps keys and values as packed low-bit codes.

    Use it like ``DynamicCache``::

        cache = QuantizedKVCache(method="turboquant", bits=3.5, config=model.config)
        model.generate(**inputs, past_key_values=cache)

    Args:
        method: one of ``METHODS`` (turboquant, turboquant-prod, polarquant, qjl, kivi).
        bits: code bits per coordinate (fractional allowed, e.g. 2.5 via an outlier-channel split).
        config: the model config.  Needed to check the attention type and to keep last layers; without
            it every layer is treated as full attention.
        window: newest tokens kept in full precision (0 = quantize everything on arrival).
        keep_first, keep_last: number of first / last decoder layers left unquantized.
        seed: base seed of the random rotations (each layer gets its own).
        group_size: KIVI group size (tokens for keys, channels for values).
        calibrate_outliers: for fractional bits, pick the high-bit channels from the first tokens seen.
        center: quantize keys/values around their per-head mean over the first tokens (stored in fp16,
            added back on read); it removes the large shared component of keys before rotation.
        derotate: quantize keys with RoPE undone (frequencies from ``config``), where a channel's offset is
            constant and ``center`` removes it; RoPE is re-applied on read, so this is exact.
        key_scale_power: scale key channel i by ``var_i^-power`` before quantizing (fp16 scales, undone on
            read); 0.25 narrows the spread of channel magnitudes, 0 turns it off.
        sink: first tokens of the sequence kept in full precision (attention sinks); not applied to
            sliding-window layers.  Default 1, except 0 for KIVI (a sink would shift its 32-token key groups,
            leaving up to 31 more tokens in full precision).
        key_basis: one ``[kv_heads, d, d]`` orthogonal basis per layer (``calibrate_key_bases``), applied to
            the keys after centring; model-level calibration data, not counted in the cache's bits.
        norm_bits: turboquant only: store each vector's norm in fp16 (16) or in 8 bits (fp16 rounded to a
            3-bit mantissa; 0.125 bits/coordinate less per norm at head_dim 64, about 1.8% rms norm error).
        score_codes: decode steps score the query against the stored codes (:mod:`.code_scoring`) instead of
            reading back a dequantized cache; keys are then kept in the post-RoPE frame (same centring and
            pair-tied scaling, no key basis).  turboquant only; the model must use ``enable_code_scoring(model)``.
        decode_buffer: keep a dequantized working copy of the quantized part, filled as tokens arrive, so a
            decode step dequantizes one token instead of the whole cache.  Faster, but the copy takes model-
            dtype memory: ``memory_report`` counts the packed storage only.

    ``plain=True`` is the paper's quantizer applied as is: center, derotate, key_scale_power and sink
    off (each may still be set explicitly).
    """

    #: the refinements ``plain=True`` turns off, with their defaults
    REFINEMENTS = {"center": True, "derotate": True, "key_scale_power": 0.25, "sink": 1}

    def __init__(
        self,
        method: str = "turboquant",
        bits: float = 3.0,
        config=None,
        *,
        window: int = 0,
        keep_first: int = 0,
        keep_last: int = 0,
        seed: int = 0,
        group_size: int = 32,
        calibrate_outliers: bool = True,
        center: bool | None = None,
        derotate: bool | None = None,
        key_scale_power: float | None = None,
        sink: int | None = None,
        decode_buffer: bool = False,
        key_basis=None,
        plain: bool = False,
        norm_bits: int = 16,
        score_codes: bool = False,
    ):
        if method not in METHODS:
            raise LowbitError(f"QuantizedKVCache: unknown method={method!r}; choose one of {sorted(METHODS)}")
        given = {"center": center, "derotate": derotate, "key_scale_power": key_scale_power, "sink": sink}
        opts = {k: (v if given[k] is None else given[k]) for k, v in self.REFINEMENTS.items()}
        if plain:
            opts = {k: (type(v)(0) if given[k] is None else given[k]) for k, v in self.REFINEMENTS.items()}
        if method == "kivi" and sink is None:
            opts["sink"] = 0
        center, derotate, key_scale_power, sink = opts["center"], opts["derotate"], opts["key_scale_power"], opts["sink"]
        self.key_basis = key_basis
        if key_basis is not None and config is not None \
                and len(key_basis) != config.get_text_config(decoder=True).num_hidden_layers:
            raise LowbitError(f"QuantizedKVCache: key_basis must hold one [heads, d, d] basis per decoder layer "
                              f"({config.get_text_config(decoder=True).num_hidden_layers}), got {len(key_basis)}; "
                              "build it with lowbit.kv.calibrate_key_bases(model, windows)")
        for name, val in (("window", window), ("keep_first", keep_first), ("keep_last", keep_last), ("sink", sink)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise LowbitError(f"QuantizedKVCache: {name} must be a non-negative integer, got {name}={val!r}")
        if isinstance(key_scale_power, bool) or not isinstance(key_scale_power, (int, float)) \
                or not 0 <= key_scale_power <= 0.5:
            raise LowbitError(f"QuantizedKVCache: key_scale_power must be a number in [0, 0.5], "
                              f"got key_scale_power={key_scale_power!r}")
        # fail now, not at the first forward, on bits the method cannot serve
        make_kv_quantizers(method, 64, 64, bits, seed, group_size, norm_bits)
        self.norm_bits = norm_bits
        if score_codes and (method != "turboquant" or key_basis is not None or decode_buffer):
            raise LowbitError("QuantizedKVCache: score_codes=True scores TurboQuant codes directly: it needs "
                              "method='turboquant', no key_basis and no decode_buffer")
        self.score_codes = score_codes
        self._rope_tables: dict = {}  # layer type -> cos / sin per position, shared by the layers
        self.method, self.bits, self.window, self.seed, self.group_size = method, float(bits), window, seed, group_size
        self.keep_first, self.keep_last, self.calibrate_outliers = keep_first, keep_last, calibrate_outliers
        self.center, self.sink, self.derotate, self.key_scale_power = center, sink, derotate, float(key_scale_power)
        self.decode_buffer, self.plain = decode_buffer, plain
        self.config = config
        self.num_layers = None
        layers = []
        if config is not None:
            layer_types, per_layer_kwargs = self._check_config(config)
            self.num_layers = len(layer_types)
            layers = [self._make_layer(i, t, kw) for i, (t, kw) in enumerate(zip(layer_types, per_layer_kwargs))]
        elif keep_last:
            raise LowbitError("QuantizedKVCache: keep_last needs config= (the number of layers)")
        super().__init__(layers=layers)

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def _check_config(config):
        text = config.get_text_config(decoder=True)
        model_type = getattr(config, "model_type", type(config).__name__)
        if getattr(config, "is_encoder_decoder", False):
            raise LowbitError(
                f"QuantizedKVCache does not support encoder-decoder models (model_type={model_type!r}); "
                "it only serves decoder-only attention models such as Llama, Qwen, Mistral or Gemma 3"
            )
        if getattr(text, "num_hidden_layers", None) is None:
            raise LowbitError(f"QuantizedKVCache: config of model_type={model_type!r} has no num_hidden_layers")
        layer_types, kwargs = get_layer_types_and_kwargs(text)
        bad = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
        if bad:
            raise LowbitError(
                f"QuantizedKVCache does not support the attention of model_type={model_type!r}: layer types {bad} "
                f"(supported: {list(SUPPORTED_LAYER_TYPES)}). Use transformers' DynamicCache for this model."
            )
        if getattr(text, "kv_lora_rank", None) or getattr(text, "q_lora_rank", None):
            raise LowbitError(
                f"QuantizedKVCache does not support multi-head latent attention (model_type={model_type!r})"
            )
        return layer_types, kwargs

    def _is_kept(self, idx: int) -> bool:
        if idx < self.keep_first:
            return True
        return self.num_layers is not None and idx >= self.num_layers - self.keep_last

    def _make_layer(self, idx: int, layer_type: str = "full_attention", kwargs: dict | None = None):
        kwargs = kwargs or {}
        if self._is_kept(idx):
            if layer_type == "sliding_attention":
                return DynamicSlidingWindowLayer(**kwargs)
            return DynamicLayer()
        make = functools.partial(self._quantizers_for, idx)
        inv_freq = rope_inv_freq(self.config, layer_type) if self.derotate or self.score_codes else None
        basis = None if self.key_basis is None else self.key_basis[idx]
        table = None
        if inv_freq is not None:
            table = self._rope_tables.setdefault(layer_type, RopeTable(inv_freq))
        extra = dict(inv_freq=inv_freq, key_scale_power=self.key_scale_power, decode_buffer=self.decode_buffer,
                     key_basis=basis, score_codes=self.score_codes, rope_table=table)
        if layer_type == "sliding_attention":
            return QuantizedSlidingKVLayer(make, kwargs["sliding_window"], self.window, self.calibrate_outliers,
                                           self.center, **extra)
        return QuantizedKVLayer(make, self.window, self.calibrate_outliers, self.center, self.sink, **extra)

    def _quantizers_for(self, idx: int, key_dim: int, value_dim: int):
        return make_kv_quantizers(self.method, key_dim, value_dim, self.bits, self.seed + 1000 * idx, self.group_size,
                                  self.norm_bits)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # no config: layers appear as the model calls them
            self.layers.append(self._make_layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- reporting -------------------------------------------------------------------------------
    @property
    def quantized_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, QuantizedKVLayer)]

    def memory_report(self) -> dict:
        """Cache size against an fp16 cache of the same tokens (full-precision parts counted at 16 bits).

        ``decode_buffer_bytes`` is the working copy ``decode_buffer=True`` keeps besides the packed cache
        (allocated capacity; 0 without it): not part of ``kv_bytes``.
        """
        total = fp16 = coords = buf = 0
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                s = layer.storage()
                total, fp16, coords = total + s["bytes"], fp16 + s["fp16_bytes"], coords + s["coords"]
                buf += s["decode_buffer_bytes"]
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                n = layer.keys.numel() + layer.values.numel()
                total, fp16, coords = total + 2 * n, fp16 + 2 * n, coords + n
        return {
            "kv_bytes": total,
            "fp16_bytes": fp16,
            "kv_bits_per_coordinate": 8.0 * total / coords if coords else float("nan"),
            "kv_memory_ratio": fp16 / total if total else float("nan"),
            "decode_buffer_bytes": buf,
        }

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(method={self.method!r}, bits={self.bits:g}, window={self.window}, plain={self.plain}, "
                f"layers={len(self.layers)}, quantized={len(self.quantized_layers)})")
