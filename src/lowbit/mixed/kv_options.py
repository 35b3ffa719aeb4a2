"""The KV-cache options `lowbit fit` chooses from, their memory layout, and their measured quality cost.

An option is the full-precision cache (`fp`: transformers' DynamicCache in the model's dtype) or a
`QuantizedKVCache(method, bits)` with its defaults (key frame, one fp16 sink token except KIVI,
no full-precision window). Its cost is MEASURED: the model (full-precision weights) runs a few
calibration windows with that cache, and the mean per-token KL(full-precision cache || this
cache) is recorded (`kvcache.evaluate.kv_eval`; every position reads keys/values back from the
quantized cache). The figures are saved as JSON in the measurement cache, keyed like the mixed
measurement (model, token ids, options), written after each option, and reused on a rerun.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_write_bytes
from lowbit.io.manifest import read_json
from lowbit.mixed.memory import KVLayout, ModelShape

log = logging.getLogger(__name__)

VERSION = 1
FP = "fp"
KV_METHODS = ("turboquant", "kivi")
KV_BITS = (2.0, 2.5, 3.0, 3.5, 4.0)
WINDOWS, SEQ_LEN = 2, 512


@dataclass(frozen=True)
class KVOption:
    method: str | None  # None: the full-precision cache
    bits: float = 16.0

    @property
    def name(self) -> str:
        return FP if self.method is None else f"{self.method}-{self.bits:g}"

    def make_cache(self, config):
        """A fresh cache of this option for one sequence."""
        if self.method is None:
            from transformers.cache_utils import DynamicCache

            return DynamicCache(config=config)
        from lowbit.kvcache.cache import QuantizedKVCache

        return QuantizedKVCache(self.method, self.bits, config)

    def layout(self, config, shape: ModelShape) -> KVLayout:
        """How this option stores a layer (packed bytes per token block measured on the quantizers
        themselves: their sizes depend only on shapes)."""
        if self.method is None:
            return KVLayout(fp=True)
        from lowbit.kvcache.cache import QuantizedKVCache

        cache = QuantizedKVCache(self.method, self.bits, config)
        kq, vq = cache._quantizers_for(0, shape.head_dim, shape.head_dim)
        block = math.lcm(kq.token_block, vq.token_block)
        x = torch.randn(1, shape.kv_heads, block, shape.head_dim, generator=torch.Generator().manual_seed(0))
        block_bytes = kq.quantize(x).nbytes + vq.quantize(x).nbytes
        return KVLayout(block=block, block_bytes=block_bytes, sink=cache.sink, window=cache.window,
                        side_vectors=3 if cache.center else 2, quantized_layers=len(cache.quantized_layers))


def kv_options(methods=KV_METHODS, bits=KV_BITS, include_fp: bool = True) -> tuple[KVOption, ...]:
    """`fp` (if asked) and every (method, bits) pair the method accepts."""
    from lowbit.kvcache.methods import METHODS, make_kv_quantizers

    out = [KVOption(None)] if include_fp else []
    for m in methods:
        if m not in METHODS:
            raise LowbitError(f"--kv-methods: unknown KV method {m!r}; choose from {sorted(METHODS)}")
        for b in bits:
            try:
                make_kv_quantizers(m, 64, 64, float(b))
            except (LowbitError, ValueError):
                log.info("KV method %s does not take %g bits; skipped", m, b)
                continue
            out.append(KVOption(m, float(b)))
    if not out:
        raise LowbitError("no KV option: give --kv-methods / --kv-bits that a KV method accepts, or keep fp")
    return tuple(out)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LowbitError(f"{what} must be comma-separated numbers, e.g. 2.5,3,4; got {text!r}") from None
    if not vals:
        raise LowbitError(f"{what} is empty; give e.g. 2.5,3,4")
    return vals


@dataclass
class KVMeasurement:
    key: str
    results: dict  # option name -> {"kl", "perplexity", "perplexity_fp", "top1_agreement", "kv_bits_per_coordinate"}
    meta: dict

    def kl(self, name: str) -> float:
        return 0.0 if name == FP else float(self.results[name]["kl"])

    def to_json(self) -> dict:
        return {"version": VERSION, "kind": "kv", "key": self.key, "meta": self.meta, "results": self.results}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1, sort_keys=True).encode())


def kv_key(model, ids: torch.Tensor, options) -> str:
    """The mixed measurement's key (model name, size, a weight's bytes, token ids) over these options."""
    from lowbit.mixed.artifact import measurement_key

    extra = f"kv-v{VERSION}|" + json.dumps([o.name for o in options])
    return measurement_key(model, ids, torch.zeros(0, dtype=torch.long), (), extra=extra)


def measure_kv(model, ids: torch.Tensor, options, path: str | Path | None = None,
               progress: bool = True) -> KVMeasurement:
    """Each option's KL against the full-precision cache on `ids` [n, seq] (full-precision weights);
    reuses / resumes the artifact at `path` (default: the measurement cache, by key)."""
    from lowbit.kvcache.evaluate import kv_eval
    from lowbit.mixed.artifact import default_measurement_path

    key = kv_key(model, ids, options)
    path = Path(path) if path is not None else default_measurement_path(key)
    meas = KVMeasurement(key, {}, {"windows": list(ids.shape), "options": [o.name for o in options]})
    if path.is_file():
        data = read_json(path, "; delete it to measure again")
        if data.get("version") == VERSION and data.get("key") == key:
            meas.results = dict(data.get("results", {}))
        else:
            log.warning("%s holds another KV measurement; measuring again", path)
    todo = [o for o in options if o.method is not None and o.name not in meas.results]
    for opt in todo:
        with torch.inference_mode():
            r = kv_eval(model, ids, {opt.name: lambda o=opt: o.make_cache(model.config)}, progress=progress)[opt.name]
        meas.results[opt.name] = {k: r[k] for k in ("kl", "perplexity", "perplexity_fp", "top1_agreement",
                                                   "kv_bits_per_coordinate")}
        meas.save(path)
        log.info("KV %s: KL %.4g on %d x %d calibration tokens", opt.name, r["kl"], *ids.shape)
    if not todo and not path.is_file():
        meas.save(path)
    log.info("KV measurement: %s", path)
    return meas


def kv_calibration_ids(tokenizer, calib_text: str | None = None, windows: int = WINDOWS, seq_len: int = SEQ_LEN):
    """Windows of the calibration split (never the evaluation split), another seed than the weights'."""
    from lowbit.calibration import calibration_batches, load_text

    return calibration_batches(tokenizer, load_text(calib_text or "pydoc").calibration, windows, seq_len, seed=2)


def kv_choice_meta(option: KVOption, context: int, memory: int) -> dict:
    """What a fitted checkpoint records (manifest key `kv_cache`) so later runs build the same cache."""
    return {"method": option.method or FP, "bits": option.bits if option.method else None, "context": context,
            "memory_budget_bytes": memory}


def cache_from_meta(meta: dict, config):
    """The cache a fitted checkpoint's `kv_cache` record names (`lowbit.mixed.kv_options.kv_choice_meta`)."""
    try:
        method = meta["method"]
        opt = KVOption(None) if method == FP else KVOption(method, float(meta["bits"]))
    except (KeyError, TypeError, ValueError):
        raise LowbitError(f"kv_cache record {meta!r} needs method and bits") from None
    return opt.make_cache(config)
