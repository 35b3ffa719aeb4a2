"""KV-cache / vector quantizers (pure tensor functions) and the transformers cache built on them.

The public names are re-exported from :mod:`lowbit.kv`.
"""
