"""Fine-tuning data: token windows of plain text, or chat/instruction examples rendered with the
model's chat template, each split into a training and a held-out evaluation part.

SOURCE is anything `--calib` takes (pydoc, python-docs, a .txt/.jsonl file or folder: plain text,
split by document as `lowbit.calibration.split_text` does, windows never cross the split) or a
.jsonl of instructions: one object a line with `messages` ([{role, content}, ...]), or
`instruction` (+ optional `input`) and `output`, or `prompt` and `response`/`completion`. Only the
answer tokens of an instruction example are trained on (the prompt's labels are -100); every k-th
example (k = 1 / eval_fraction) is held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.calibration.text import jsonl_rows, load_documents, split_text
from lowbit.errors import LowbitError

IGNORE = -100
CHAT_KEYS = ("messages", "instruction", "prompt")


@dataclass
class Examples:
    """ids and labels [n, seq_len] (labels IGNORE where no loss is taken)."""

    ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class Dataset:
    train: Examples
    eval: Examples
    kind: str  # "text" or "chat"


def _windows(tokenizer, text: str, seq_len: int, max_windows: int | None, what: str) -> Examples:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise LowbitError(f"the {what} text has {ids.numel()} tokens; need at least --seq-len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    w = ids[: n * seq_len].reshape(n, seq_len).clone()
    return Examples(w, w.clone())


def _rows(path: Path) -> list[tuple[int, dict]]:
    rows = jsonl_rows(path)
    if not rows:
        raise LowbitError(f"{path} holds no examples (empty file)")
    return rows


def _messages(path: Path, i: int, row: dict) -> list[dict]:
    if "messages" in row:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
            raise LowbitError(f"{path}:{i}: 'messages' must be a list of at least two {{role, content}} objects")
        return msgs
    if "instruction" in row:
        if "output" not in row:
            raise LowbitError(f"{path}:{i}: an 'instruction' example needs an 'output' field")
        user = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]
    answer = row.get("response", row.get("completion"))
    if answer is None:
        raise LowbitError(f"{path}:{i}: a 'prompt' example needs a 'response' or 'completion' field")
    return [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(answer)}]


def _chat_example(tokenizer, msgs: list[dict], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(full, add_special_tokens=False).input_ids[:seq_len]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids) if full.startswith(prompt) else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x = torch.full((seq_len,), pad, dtype=torch.long)
    y = torch.full((seq_len,), IGNORE, dtype=torch.long)
    x[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    y[n_prompt: len(ids)] = x[n_prompt: len(ids)]
    return x, y


def _chat(tokenizer, path: Path, rows, seq_len: int, eval_fraction: float) -> Dataset:
    if getattr(tokenizer, "chat_template", None) is None:
        raise LowbitError(f"{path} holds chat/instruction examples but the model's tokenizer has no chat template")
    period = max(2, round(1 / eval_fraction))
    parts: dict[bool, list] = {True: [], False: []}
    for k, (i, row) in enumerate(rows):
        x, y = _chat_example(tokenizer, _messages(path, i, row), seq_len)
        if (y != IGNORE).any():
            parts[k % period == period - 1].append((x, y))
    if not parts[False] or not parts[True]:
        raise LowbitError(f"{path}: {len(rows)} examples are too few to hold out an evaluation part "
                          f"(every {period}th example; answers cut off by --seq-len {seq_len} do not count)")

    def stack(items):
        return Examples(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    return Dataset(stack(parts[False]), stack(parts[True]), "chat")


def load_dataset(source: str, tokenizer, seq_len: int = 256, eval_fraction: float = 0.1,
                 max_eval_windows: int | None = None, max_chars: int | None = None, field: str = "text") -> Dataset:
    """The training and held-out examples of `source` (see module docstring). max_chars: use only
    the first documents, up to this many characters (long corpora, short runs)."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        rows = _rows(path)
        first = rows[0][1]
        if any(k in first for k in CHAT_KEYS):
            return _chat(tokenizer, path, rows, seq_len, eval_fraction)
        if field not in first:
            raise LowbitError(f"{path}:{rows[0][0]} has no text field: expected {field!r} (plain text) or one of "
                              f"{', '.join(CHAT_KEYS)} (chat/instruction examples)")
    docs = load_documents(source, field)
    if max_chars is not None:
        kept, total = [], 0
        for d in docs:
            kept.append(d)
            total += len(d)
            if total >= max_chars:
                break
        docs = kept
    split = split_text(docs, eval_fraction)
    return Dataset(_windows(tokenizer, split.calibration, seq_len, None, "training"),
                   _windows(tokenizer, split.evaluation, seq_len, max_eval_windows, "evaluation"), "text")
