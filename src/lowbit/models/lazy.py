"""Models whose decoder blocks stay on disk until the pipeline reaches them.

`load_lazy` builds the model on the meta device, loads everything outside the decoder blocks
(buffers such as rotary frequencies come from a zero-layer CPU twin), and leaves the blocks to
`materialize_block`. The pipeline quantizes block by block and swaps each finished block's
Linears for packed ones, so the full-precision model is never resident at once: peak memory is
one block plus the calibration activations, not the whole fp32 model.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from lowbit.models.arch import arch_for, blocks_of

log = logging.getLogger(__name__)

_ATTR = "_lowbit_lazy_blocks"


def _weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a Hugging Face folder (single file or sharded)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


class LazyBlocks:
    """The decoder blocks' tensors still on disk (the blocks themselves on the meta device)."""

    def __init__(self, files: dict[str, Path], prefix: str, n_blocks: int):
        self.files, self.prefix = files, prefix
        self.pending = set(range(n_blocks))
        self.parked: dict[str, list[str]] = {}  # module name -> its tensor names, on meta until `unpark`

    def names(self, i: int) -> list[str]:
        head = f"{self.prefix}.{i}."
        return [n for n in self.files if n.startswith(head)]

    def load(self, model, i: int, dtype: torch.dtype) -> None:
        if i not in self.pending:
            return
        head = f"{self.prefix}.{i}."
        # copies, not views of the file mapping: the mapping (and every page read through it)
        # is released as soon as the block's Linears are swapped out
        state = {name[len(head):]: t.to(dtype, copy=True) for name, t in _read(self.files, self.names(i)).items()}
        blocks_of(model, arch_for(model))[i].load_state_dict(state, strict=True, assign=True)
        self.pending.discard(i)


def _read(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, group in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in group:
                out[name] = f.get_tensor(name)
    return out


def load_lazy(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with the decoder blocks left on disk; None when the folder's layout does
    not allow it (then load eagerly)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        return None
    config = AutoConfig.from_pretrained(folder)
    arch = arch_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # buffers (rotary frequencies) are computed at construction: take them from a tiny CPU model
    tiny_config = copy.deepcopy(config)
    tiny_config.num_hidden_layers, tiny_config.vocab_size = 0, 8
    tiny = AutoModelForCausalLM.from_config(tiny_config, dtype=dtype)
    tiny_buffers = dict(tiny.named_buffers())
    buffers = dict(model.named_buffers())
    params = dict(model.named_parameters(remove_duplicate=False))
    head_tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [n for n in params if n not in files and not (n == f"{arch.head}.weight" and head_tied)]
    missing += [n for n in buffers if n not in tiny_buffers]
    unknown = [n for n in files if n not in params]
    if missing or unknown:
        log.info("lazy loading of %s not possible (missing %s, unexpected %s); loading it whole",
                 folder, missing[:3], unknown[:3])
        return None
    n_blocks = len(blocks_of(model, arch))
    lazy = LazyBlocks(files, arch.blocks, n_blocks)
    in_blocks = {n for i in range(n_blocks) for n in lazy.names(i)}
    # copies: a view would keep the whole file mapping alive, and every page read through it
    # (blocks, embedding rows) resident (measured 66 MiB at the end of a GPTQ run)
    state = {n: t.to(dtype, copy=True) for n, t in _read(files, [n for n in files if n not in in_blocks]).items()}
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in tiny_buffers.items():  # most are non-persistent: load_state_dict skips them
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf
    if head_tied:
        model.tie_weights()
    model.eval()
    setattr(model, _ATTR, lazy)
    setattr(model, _ATTR + "_dtype", dtype)
    return model, AutoTokenizer.from_pretrained(folder)


def materialize_block(model, i: int) -> None:
    """Load block i's weights if the model was loaded lazily (no-op otherwise)."""
    lazy = getattr(model, _ATTR, None)
    if lazy is not None:
        lazy.load(model, i, getattr(model, _ATTR + "_dtype"))


def is_lazy(model) -> bool:
    lazy = getattr(model, _ATTR, None)
    return lazy is not None and bool(lazy.pending)


def park(model, module_name: str) -> bool:
    """Put a module's parameters (e.g. the embeddings, a tied head with them) back on the meta
    device until `unpark` reads them from disk again. For lazily loaded models only; returns
    whether anything was parked. The pipeline parks the embeddings between capturing the first
    block's inputs and the end: 108 MiB of float32 that the block-by-block pass never reads."""
    lazy = getattr(model, _ATTR, None)
    if lazy is None or module_name in lazy.parked:
        return False
    module = model.get_submodule(module_name)
    own = list(module.named_parameters(recurse=False))
    names = [f"{module_name}.{n}" for n, _ in own]
    if not own or any(n not in lazy.files for n in names):
        return False
    for leaf, p in own:
        setattr(module, leaf, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    lazy.parked[module_name] = names
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # a tied head shares the parked tensor, or it would keep the old one alive
    return True


def unpark(model) -> None:
    """Read every parked module's parameters back from disk (no-op when nothing is parked)."""
    lazy = getattr(model, _ATTR, None)
    if lazy is None or not lazy.parked:
        return
    dtype = getattr(model, _ATTR + "_dtype")
    for module_name, names in list(lazy.parked.items()):
        head = len(module_name) + 1
        state = {n[head:]: t.to(dtype, copy=True) for n, t in _read(lazy.files, names).items()}
        model.get_submodule(module_name).load_state_dict(state, strict=False, assign=True)
        del lazy.parked[module_name]
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
