"""GGUF (llama.cpp) out and in: records as GGUF blocks (`gguf_blocks`), nothing re-rounded.

Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, per tensor. Each quantized Linear's type
follows from its record's spec (`gguf_blocks.LAYOUTS`); `plan_recipe` turns a type into those
specs before quantizing, with llama.cpp's fallback for rows that are not a multiple of a K-type's
256-weight super-block (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). Tensors that are not records
are quantized here with lowbit's round-to-nearest onto the type's grid, at llama.cpp's default
types: the output matrix (or the token embedding when tied to it) Q6_K (Q8_0 when the base type
is Q8_0), the token embedding otherwise the base type, both through the same fallback; 1-D
tensors F32. Format options: `type`, `embed_type`, `output_type`, `tokenizer_pre`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from lowbit.core.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.export import gguf_meta
from lowbit.export.gguf_blocks import LAYOUTS, decode, encode, layout_for_spec, type_for_row
from lowbit.export.model import QuantizedModel
from lowbit.io.atomic import atomic_path

log = logging.getLogger(__name__)

TYPES = tuple(LAYOUTS)
FLOAT_TYPES = ("F32", "F16")  # for tensors that are not records (e.g. a float reference file)
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0",
              "Q5_1": "MOSTLY_Q5_1", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
              "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K"}


def _check_type(t: str | None, key: str = "type", floats: bool = False) -> str | None:
    valid = TYPES + (FLOAT_TYPES if floats else ())
    if t is not None and t not in valid:
        raise LowbitError(f"gguf format option {key}={t!r} is not a type lowbit writes; choose one of {', '.join(valid)}")
    return t


def _row_type(t: str, cols: int) -> str:
    return t if t in FLOAT_TYPES else type_for_row(t, cols)


def spec_for(type_name: str, cols: int):
    """The record spec a Linear with `cols` inputs needs to be written as `type_name` (after fallback)."""
    return LAYOUTS[type_for_row(_check_type(type_name), cols)].spec


def _what_fits(spec) -> str:
    same = [n for n, lay in LAYOUTS.items() if lay.spec.bits == spec.bits] or list(LAYOUTS)
    return ", ".join(f"{n} = {LAYOUTS[n].spec.describe()}" for n in same)


def _record_type(name: str, qw) -> str:
    lay = layout_for_spec(qw.spec)
    if lay is None or qw.g_idx is not None:
        why = "act-order g_idx" if lay is not None else qw.spec.describe()
        raise LowbitError(f"{name}: GGUF cannot hold {why}; what would fit: {_what_fits(qw.spec)} — quantize with "
                          f"--format gguf --format-option type=TYPE to get that grid")
    cols = qw.shape[1]
    if cols % lay.block:
        raise LowbitError(f"{name}: rows of {cols} weights are not a multiple of {lay.name}'s block of {lay.block}; "
                          f"llama.cpp uses {lay.fallback or 'another type'} for such rows")
    return lay.name


def _default_types(base: str, embed_type: str | None, output_type: str | None) -> tuple[str, str]:
    output = output_type or (base if base in ("Q8_0",) + FLOAT_TYPES else "Q6_K")
    return embed_type or base, output


def _plan(qm: QuantizedModel, base: str | None, embed_type: str | None, output_type: str | None):
    """[(gguf name, hf name, kind, type)] for every tensor, checked before anything is written."""
    config = qm.config
    names = gguf_meta.name_map(config)
    rec_types = {n: _record_type(n, qw) for n, qw in qm.layers.items()}
    if base is None:
        base = Counter(rec_types.values()).most_common(1)[0][0] if rec_types else "Q8_0"
    embed_t, output_t = _default_types(base, embed_type, output_type)
    has_output = "lm_head" in qm.layers or "lm_head.weight" in qm.tensors
    out = []
    for n, t in rec_types.items():
        if n not in names:
            raise LowbitError(f"{n}: no GGUF tensor name for this layer (Llama-family layout expected)")
        out.append((names[n] + ".weight", n, "record", t))
    for key, value in qm.tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner not in names or leaf not in ("weight", "bias"):
            raise LowbitError(f"{key}: no GGUF tensor name for this tensor (Llama-family layout expected)")
        if owner in qm.layers:
            raise LowbitError(f"{key}: llama.cpp's Llama graph has no bias on {owner}")
        gname = f"{names[owner]}.{leaf}"
        if value.dim() == 1:
            out.append((gname, key, "f32", "F32"))
            continue
        tied_embed = owner == "model.embed_tokens" and not has_output
        t = output_t if owner == "lm_head" or tied_embed else embed_t
        out.append((gname, key, "float", _row_type(t, value.shape[1])))
    return sorted(out, key=lambda r: _tensor_order(r[0])), base


def _tensor_order(gname: str):
    m = re.match(r"blk\.(\d+)\.", gname)
    return (1, int(m.group(1)), gname) if m else (0 if gname.startswith("token_embd") else 2, 0, gname)


def _rows(config, hf_key: str, t: torch.Tensor) -> torch.Tensor:
    perm = gguf_meta.rope_rows(config, hf_key.rpartition(".")[0] if hf_key.endswith((".weight", ".bias")) else hf_key)
    return t if perm is None else t[perm]


def _permuted(config, name: str, qw):
    perm = gguf_meta.rope_rows(config, name)
    if perm is None:
        return qw
    rows = lambda t: None if t is None else t[perm] if t.shape[0] > 1 else t  # noqa: E731
    return dataclasses.replace(qw, codes=qw.codes[perm], scale=rows(qw.scale), zero=rows(qw.zero))


def write(qm: QuantizedModel, out: str | Path, *, overwrite: bool = False, type: str | None = None,
          embed_type: str | None = None, output_type: str | None = None, tokenizer_pre: str | None = None,
          progress: bool = False) -> Path:
    """Write `qm` to the .gguf file `out` atomically; every tensor's type is checked first."""
    qm = qm.float_embeddings()  # an int8 table (--embed-bits) is written at embed_type like any float one
    out = Path(out)
    base = _check_type(type, floats=True)
    _check_type(embed_type, "embed_type", floats=True)
    _check_type(output_type, "output_type", floats=True)
    if out.suffix != ".gguf":
        raise LowbitError(f"{out}: a GGUF output is one file ending in .gguf")
    if out.exists() and not overwrite:
        raise LowbitError(f"output file {out} exists; pass --overwrite to replace it")
    arch = gguf_meta.gguf_arch(qm.config)
    if qm.tokenizer is None:
        raise LowbitError("the GGUF writer needs the model's tokenizer (llama.cpp reads it from the file)")
    plan, base = _plan(qm, base, embed_type, output_type)
    file_type = int(getattr(gguf.LlamaFileType, FILE_TYPES[base]))
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        gguf_meta.add_model_keys(w, qm.config, str(qm.meta.get("source", "lowbit")), file_type)
        w.add_string("general.quantized_by", "lowbit")
        gguf_meta.add_tokenizer(w, qm.tokenizer, qm.config, tokenizer_pre or qm.meta.get("tokenizer_pre"))
        counts = Counter()
        for gname, key, kind, t in plan:
            if kind == "f32" or t in FLOAT_TYPES:
                value = _rows(qm.config, key, qm.tensors[key]).float().numpy()
                w.add_tensor(gname, value.astype(np.float16) if t == "F16" else value)
            else:
                if kind == "record":
                    qw = _permuted(qm.config, key, qm.layers[key])
                else:
                    qw = quantize(_rows(qm.config, key, qm.tensors[key].float()), LAYOUTS[t].spec)
                data = encode(qw, LAYOUTS[t], key)
                w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[t])  # shape from the bytes
            counts[t] += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
    log.info("saved %s (%s)", out, ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    return out


def plan_recipe(recipe, model, *, type: str | None = None, output_type: str | None = None, **_options):
    """The recipe whose Linears come out on GGUF grids: every Linear at `type` (or at the GGUF type
    of the recipe override that matches it), the head (if quantized) at the output type, each
    through llama.cpp's fallback where its rows are too short for the type. Returns a recipe with
    one exact-name override per Linear that differs from the base spec."""
    from lowbit.models.arch import arch_for, blocks_of, get_module

    if type is None:
        return recipe
    _check_type(type)
    _check_type(output_type, "output_type")
    for pattern, spec in recipe.overrides:
        if layout_for_spec(spec) is None:
            raise LowbitError(f"recipe override {pattern!r}: GGUF cannot hold {spec.describe()}; what would fit: "
                              f"{_what_fits(spec)}")
    arch = arch_for(model)
    _, output_t = _default_types(type, None, output_type)
    names = [f"{arch.blocks}.{i}.{lin}" for i in range(len(blocks_of(model, arch))) for lin in arch.linears]
    names += [arch.head] if recipe.quantize_head else []
    base = LAYOUTS[type].spec
    extra = []
    for name in names:
        spec = recipe.spec_for(name)
        if spec is None:
            continue
        if name == arch.head:
            t = output_t
        elif any(re.search(p, name) for p, _ in recipe.overrides):
            t = layout_for_spec(spec).name
        else:
            t = type
        want = LAYOUTS[type_for_row(t, get_module(model, name).in_features)].spec
        if want != base or name == arch.head:
            extra.append((f"^{re.escape(name)}$", want))
    head = dict(extra).get(f"^{re.escape(arch.head)}$")
    return dataclasses.replace(recipe, spec=base, overrides=tuple(extra), head_spec=head)


def read(path: str | Path) -> QuantizedModel:
    """Records for the tensors stored as one of lowbit's GGUF types, float tensors for the rest
    (other quantized types dequantized by the `gguf` package), config and tokenizer through
    transformers. Llama-family files."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.models.validate import check_gguf

    path = Path(path)
    check_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"{path} is not a GGUF file lowbit can read ({e})") from None
    gguf_meta.gguf_arch(config)
    back = {g: hf for hf, g in gguf_meta.name_map(config).items()}
    linears = set(gguf_meta.HF_LINEARS) | {"lm_head"}
    layers, tensors, types = {}, {}, {}
    for t in reader.tensors:
        base, _, leaf = t.name.rpartition(".")
        if base not in back:
            raise LowbitError(f"{path}: tensor {t.name} has no Hugging Face name in a Llama model")
        hf = back[base]
        qtype = t.tensor_type.name
        types[t.name] = qtype
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        perm = gguf_meta.rope_rows(config, hf)
        inv = None if perm is None else torch.argsort(perm)
        is_linear = hf == "lm_head" or hf.split(".", 3)[-1] in linears
        if qtype in LAYOUTS and is_linear and leaf == "weight":
            qw = decode(np.asarray(t.data), LAYOUTS[qtype], *shape)
            layers[hf] = qw if inv is None else _permuted_inv(qw, inv)
            continue
        arr = np.asarray(t.data)
        if qtype not in ("F32", "F16"):
            arr = gguf.quants.dequantize(arr, t.tensor_type)
        value = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
        tensors[f"{hf}.{leaf}"] = value if inv is None else value[inv]
    if getattr(config, "tie_word_embeddings", False) and "lm_head" in layers:
        config.tie_word_embeddings = False
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    meta = {"format": "gguf", "source": str(path), "gguf_types": types}
    pre = reader.fields.get("tokenizer.ggml.pre")
    if pre is not None:
        meta["tokenizer_pre"] = pre.contents()
    return QuantizedModel(config, layers, tensors, tokenizer, meta)


def _permuted_inv(qw, inv):
    rows = lambda t: None if t is None else t[inv] if t.shape[0] > 1 else t  # noqa: E731
    return dataclasses.replace(qw, codes=qw.codes[inv].contiguous(), scale=rows(qw.scale), zero=rows(qw.zero))
