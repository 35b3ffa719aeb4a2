"""Text sources: stdlib pydoc topics (default), local .txt/.jsonl/folders, Hugging Face datasets."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.io.paths import hub_shaped

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".rst", ".md")
DEBIAN_PYDOC = Path("/usr/share/doc/python3.11-doc/html/_sources")


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_text_file(path: Path) -> str:
    """The file's text; binary or undecodable content is an error naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LowbitError(f"cannot read text source {path} ({e.strerror or e})") from None
    if b"\x00" in data:
        raise LowbitError(f"text source {path} is binary (it holds NUL bytes), not text; "
                          "pass a UTF-8 .txt/.jsonl file, a folder of them, pydoc or a dataset name")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"text source {path} is not UTF-8 text (undecodable byte at offset {e.start}); "
                          "convert it to UTF-8 or pass another file") from None


def jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a .jsonl file; one error naming the line
    that is not a JSON object."""
    rows = []
    for i, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LowbitError(f"{path}:{i} is not valid JSON") from None
        if not isinstance(row, dict):
            raise LowbitError(f"{path}:{i} is not a JSON object")
        rows.append((i, row))
    return rows


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    for i, row in jsonl_rows(path):
        if field not in row:
            raise LowbitError(f"{path}:{i} has no {field!r} field")
        docs.append(str(row[field]))
    return docs


def _hf_documents(name: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"text source {name}: no such file or folder; read as a hub dataset name it needs "
                          "`pip install datasets`") from None
    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as e:
        raise LowbitError(f"cannot load dataset {name!r} ({type(e).__name__}: {e})") from None
    return [str(t) for t in ds[field]]


def load_documents(source: str = "pydoc", field: str = "text") -> list[str]:
    """Documents in a deterministic order.

    source: "pydoc" (stdlib pydoc_data.topics), "python-docs" (Debian python3.11-doc reST sources),
    a .txt/.rst/.md file, a .jsonl file (one {"text": ...} per line), a folder of text files,
    or a Hugging Face dataset name ("name" or "name:config").
    """
    if source == "pydoc":
        return _pydoc_documents()
    if source == "python-docs":
        if not DEBIAN_PYDOC.is_dir():
            raise LowbitError(f"{DEBIAN_PYDOC} is missing; apt-get install python3.11-doc")
        source = str(DEBIAN_PYDOC)
    path = check_text_source(source)
    if path is None:
        docs = _hf_documents(source, field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + (".jsonl",) and p.is_file())
        if not files:
            raise LowbitError(f"text source {path} holds no {', '.join(TEXT_SUFFIXES + ('.jsonl',))} files")
        docs = []
        for f in files:
            docs.extend(_jsonl_documents(f, field) if f.suffix == ".jsonl" else [read_text_file(f)])
    else:
        docs = _jsonl_documents(path, field) if path.suffix == ".jsonl" else [read_text_file(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LowbitError(f"text source {source} holds no text")
    return docs


def check_text_source(source: str) -> Path | None:
    """Cheap check of a text source before any work: the local file or folder it names (None for
    pydoc or a dataset name); a path that does not exist is an error naming it."""
    if source == "pydoc":
        return None
    if source == "python-docs":
        if not DEBIAN_PYDOC.is_dir():
            raise LowbitError(f"{DEBIAN_PYDOC} is missing; apt-get install python3.11-doc")
        return DEBIAN_PYDOC
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        return path
    if path.exists():
        raise LowbitError(f"text source {source} is neither a file nor a folder")
    name = source.partition(":")[0]
    if "/" not in name and "\\" not in name and not name.startswith((".", "~")) and not path.suffix:
        return None  # a dataset name ("wikitext", "wikitext:wikitext-2-raw-v1")
    if hub_shaped(name):
        return None  # "owner/name" on the hub
    raise LowbitError(f"text source {source}: no such file or folder; pass a .txt/.jsonl file, a folder of "
                      "them, pydoc, python-docs or a dataset name")


@dataclass(frozen=True)
class TextSplit:
    calibration: str
    evaluation: str


def split_text(documents: list[str], eval_fraction: float = 0.3) -> TextSplit:
    """Deterministic split by document: every 1/eval_fraction-th document goes to evaluation.

    A single document is split at a paragraph boundary instead. The two parts never overlap:
    evaluation paragraphs that also occur in the calibration part are dropped.
    """
    if not 0 < eval_fraction < 1:
        raise LowbitError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1")
    if len(documents) == 1:
        text = documents[0]
        cut = int(len(text) * (1 - eval_fraction))
        nl = text.find("\n\n", cut)
        cut = nl if nl != -1 else cut
        calib, evaluation = text[:cut], text[cut:]
    else:
        period = max(2, round(1 / eval_fraction))
        evaluation = "\n\n".join(d for i, d in enumerate(documents) if i % period == period - 1)
        calib = "\n\n".join(d for i, d in enumerate(documents) if i % period != period - 1)
        # documents can share paragraphs (pydoc topics repeat whole sections): drop those from evaluation
        seen = {p.strip() for p in calib.split("\n\n")}
        evaluation = "\n\n".join(p for p in evaluation.split("\n\n") if p.strip() not in seen)
    if not calib.strip() or not evaluation.strip():
        raise LowbitError("the text is too short to split into calibration and evaluation parts")
    return TextSplit(calib, evaluation)


def load_text(source: str = "pydoc", eval_fraction: float = 0.3, field: str = "text") -> TextSplit:
    return split_text(load_documents(source, field), eval_fraction)


def load_text_or_pydoc(source: str, eval_fraction: float = 0.3) -> tuple[str, TextSplit]:
    """(name, split) of `source`, or of the stdlib pydoc text when `source` cannot be had
    (e.g. python-docs without the Debian package): what the benchmarks evaluate on."""
    try:
        return source, load_text(source, eval_fraction)
    except LowbitError as e:
        log.warning("%s; using the stdlib pydoc text instead", e)
        return "pydoc", load_text("pydoc", eval_fraction)
