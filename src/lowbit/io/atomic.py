"""Atomic writes: build in a temporary sibling, then rename over the target.

A temporary sibling is named `.NAME.tmp-PID-XXXX` (PID: the process writing it). A process killed
while writing (SIGKILL, power loss) leaves it behind; the next write to the same target removes
such leftovers of processes that no longer run (`remove_stale_temporaries`).
"""

from __future__ import annotations

from collections.abc import Callable

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

MANIFEST = "lowbit.json"  # what makes a folder a lowbit checkpoint


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_quantized_checkpoint(path: Path) -> bool:
    """A folder --overwrite may replace: a lowbit checkpoint (`lowbit.json`) or a quantized
    checkpoint in a Hugging Face format (config.json with a `quantization_config`: what lowbit's
    other writers produce). Never a plain model folder, nor anything else."""
    return (_json(path / MANIFEST).get("format") == "lowbit" or bool(_json(path / "config.json").get("quantization_config"))
            or _json(path / "ptq.json").get("format") == "lowbit-ptq")


def _within(path: Path, folder: Path) -> bool:
    """path is `folder` or inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_output_dir(path: str | Path, overwrite: bool, protect: tuple = (), *,
                     replaceable: Callable[[Path], bool] | None = None, refusal: str | None = None,
                     hint: str = "name a new folder for the checkpoint, e.g. -o out/model-w4") -> Path:
    """Refuse an output folder before any work: the current folder or one of its parents, a folder
    holding one of the `protect` paths (the input model), an existing folder without `overwrite`,
    and with `overwrite` anything but an empty folder or one `replaceable` accepts (default: a
    quantized checkpoint; `refusal` then says what else may be replaced). Returns the path."""
    path = Path(path).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, resolved):
        raise LowbitError(f"output folder {path} is the current folder or one of its parents; {hint}")
    for p in protect:
        p = Path(p).expanduser()
        if p.exists() and _within(p.resolve(), resolved):
            raise LowbitError(f"output folder {path} would replace the input {p}; choose another output folder")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise LowbitError(f"output {path} exists and is not a folder; choose another output folder")
        if not overwrite:
            raise LowbitError(f"output folder {path} exists; pass --overwrite to replace it")
        if any(path.iterdir()) and not (replaceable or is_quantized_checkpoint)(path):
            raise LowbitError(refusal.format(path=path) if refusal else
                              f"output folder {path} is not a lowbit checkpoint (no {MANIFEST}, no quantization_config) "
                              "and not empty; --overwrite only replaces quantized checkpoints or empty folders: "
                              "choose another output folder or remove it yourself")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot create output folder {path}: {parent} is not a writable folder")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove `.NAME.tmp-*` and `.NAME.old-*` siblings of `target` left by writers that no longer
    run (killed mid-write); returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for kind in ("tmp", "old"):
        for p in target.parent.glob(f".{glob_escape(target.name)}.{kind}-*"):
            pid = p.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue  # another run is writing it right now
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d stale temporar%s of %s left by an interrupted run", len(removed),
                 "y" if len(removed) == 1 else "ies", target)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling folder; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    if not target.name or target.name in (".", ".."):
        raise LowbitError(f"{target} names no folder; pass a folder name")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a binary file in a temporary sibling of `path`; on success it is flushed, synced and
    renamed over `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield the path of a temporary sibling of `path` for a writer that opens files by name; on
    success the file is synced and renamed over `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a file for others to read, not mkstemp's 0600
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)
