"""KV-cache and vector quantization: TurboQuant, QJL, PolarQuant, a KIVI baseline and a transformers Cache.

    from lowbit.kv import QuantizedKVCache
    cache = QuantizedKVCache(method="turboquant", bits=3.5, config=model.config)
    model.generate(**inputs, past_key_values=cache)
"""

from lowbit.kvcache.cache import QuantizedKVCache
from lowbit.kvcache.codebook import polar_angle_codebook, sphere_codebook
from lowbit.kvcache.evaluate import cache_factory, greedy_agreement, kv_eval
from lowbit.kvcache.key_basis import calibrate_key_bases, key_basis_from_keys
from lowbit.kvcache.kivi import KIVI
from lowbit.kvcache.methods import METHODS, make_kv_quantizers
from lowbit.kvcache.packed import Packed
from lowbit.kvcache.polarquant import PolarQuant
from lowbit.kvcache.qjl import QJL
from lowbit.kvcache.turboquant import TurboQuantMSE, TurboQuantProd

__all__ = [
    "TurboQuantMSE", "TurboQuantProd", "QJL", "PolarQuant", "KIVI", "QuantizedKVCache", "Packed", "METHODS",
    "make_kv_quantizers", "sphere_codebook", "polar_angle_codebook", "kv_eval", "greedy_agreement", "cache_factory",
    "calibrate_key_bases", "key_basis_from_keys",
]
