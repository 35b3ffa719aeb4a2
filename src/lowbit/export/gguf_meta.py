"""GGUF metadata: architecture keys, tensor names (Hugging Face <-> GGUF), the llama q/k row order,
and the tokenizer (byte-level BPE, as llama.cpp's "gpt2" tokenizer model).

Llama-family models only (model_type llama / mistral, written as GGUF architecture "llama").
"""

from __future__ import annotations

import json
import logging

import gguf
import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

GGUF_ARCH = {"llama": "llama", "mistral": "llama"}
# tokenizer.ggml.pre for known byte-level BPE vocabularies (llama.cpp picks its pre-tokenizer regex by it)
PRE_BY_VOCAB = {49152: "smollm", 128256: "llama-bpe"}

HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HF_BLOCK_OTHER = ("input_layernorm", "post_attention_layernorm")


def gguf_arch(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in GGUF_ARCH:
        raise LowbitError(f"the GGUF writer handles Llama-family models ({', '.join(GGUF_ARCH)}); "
                          f"this model is {mt!r}")
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise LowbitError("the GGUF writer does not write rope scaling yet; this model's config has rope_scaling")
    return GGUF_ARCH[mt]


def name_map(config) -> dict[str, str]:
    """Hugging Face module name -> GGUF tensor base name, for every tensor a Llama model has."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf = ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(config.num_hidden_layers):
        hf += [f"model.layers.{i}.{n}" for n in HF_LINEARS + HF_BLOCK_OTHER]
    return {n: tmap.get_name(n) for n in hf}


def rope_rows(config, hf_name: str) -> torch.Tensor | None:
    """Row order llama.cpp expects for q_proj / k_proj (convert_hf_to_gguf's permute: per head,
    interleave the two rotary halves); None for other tensors. Rows move with their codes and
    per-row scales, so a record permutes exactly."""
    if hf_name.endswith("self_attn.q_proj"):
        heads = config.num_attention_heads
    elif hf_name.endswith("self_attn.k_proj"):
        heads = config.num_key_value_heads
    else:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return torch.arange(heads * head_dim).reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_model_keys(w: gguf.GGUFWriter, config, name: str, file_type: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, config, pre: str | None = None) -> None:
    """A fast byte-level BPE tokenizer as GGUF's "gpt2" tokenizer: tokens, types, merges, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("the GGUF writer needs a fast (tokenizers) tokenizer")
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"the GGUF writer handles byte-level BPE tokenizers; this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    n = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if pre is None:
        pre = PRE_BY_VOCAB.get(config.vocab_size, "default")
        if pre == "default":
            log.warning("unknown BPE vocabulary of %d tokens: tokenizer.ggml.pre = 'default' (pass "
                        "--format-option tokenizer_pre=NAME for llama.cpp's pre-tokenizer of this model)", n)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)
