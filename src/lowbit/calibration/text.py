"""Text sources: stdlib pydoc topics (default), local .txt/.jsonl/folders, Hugging Face datasets."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".rst", ".md")
DEBIAN_PYDOC = Path("/usr/share/doc/python3.11-doc/html/_sources")


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LowbitError(f"{path}:{i} is not valid JSON") from None
        if not isinstance(row, dict) or field not in row:
            raise LowbitError(f"{path}:{i} has no {field!r} field")
        docs.append(str(row[field]))
    return docs


def _hf_documents(name: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"{name!r} is not a local path; loading a hub dataset needs `pip install datasets`") from None
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
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + (".jsonl",) and p.is_file())
        docs = []
        for f in files:
            docs.extend(_jsonl_documents(f, field) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8", errors="replace")])
    elif path.is_file():
        docs = _jsonl_documents(path, field) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8", errors="replace")]
    elif path.suffix or source.startswith((".", "/")):
        raise LowbitError(f"text source {source} does not exist")
    else:
        docs = _hf_documents(source, field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LowbitError(f"text source {source} holds no text")
    return docs


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
