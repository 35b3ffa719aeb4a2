"""Architecture knowledge as data: where the decoder blocks are and which Linears each holds.

`sequential` orders a block's Linears for true-sequential calibration (each group sees the
already-quantized outputs of the previous ones). `smooth` lists AWQ smoothing pairs:
(previous op, the Linears that read its output). `norm_offset` is 1 where the RMSNorm
multiplies by (1 + weight), as in Gemma.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowbit.errors import LowbitError

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


@dataclass(frozen=True)
class Arch:
    name: str
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    smooth: tuple[tuple[str, tuple[str, ...]], ...]
    embed: str = "model.embed_tokens"
    head: str = "lm_head"
    final_norm: str = "model.norm"
    norm_offset: float = 0.0

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)


_LLAMA_SEQ = ((Q, K, V), (O,), (GATE, UP), (DOWN,))

LLAMA = Arch(
    name="llama",
    blocks="model.layers",
    sequential=_LLAMA_SEQ,
    smooth=(
        ("input_layernorm", (Q, K, V)),
        (V, (O,)),
        ("post_attention_layernorm", (GATE, UP)),
        (UP, (DOWN,)),
    ),
)

# Gemma3: same Linears; the MLP reads the pre-feedforward norm, and RMSNorm scales by (1 + weight)
GEMMA3 = replace(
    LLAMA,
    name="gemma3",
    smooth=(
        ("input_layernorm", (Q, K, V)),
        (V, (O,)),
        ("pre_feedforward_layernorm", (GATE, UP)),
        (UP, (DOWN,)),
    ),
    norm_offset=1.0,
)

# model_type (config.json) -> architecture
ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma3_text": GEMMA3,
}


def arch_for(model_or_config) -> Arch:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise LowbitError(
            f"architecture {model_type!r} is not known to lowbit; known model types: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


def get_module(model, dotted: str):
    mod = model
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def blocks_of(model, arch: Arch):
    return get_module(model, arch.blocks)
