"""lowbit's own multiple-choice task and its log-likelihood scoring, for machines where no
lm-eval task's data can be read offline.

The task ("pydoc-continuation") is built from the stdlib's `pydoc_data.topics`: the first words of
a documentation paragraph, and four continuations — the paragraph's own next words and those of
three other paragraphs (HellaSwag's shape). Scoring is lm-eval's log-likelihood request, computed
the way lm-eval's Hugging Face model computes it (`lm_eval.models.huggingface.HFLM.loglikelihood`,
tested equal): the context's trailing spaces move to the continuation, the continuation's tokens
are those of `context + continuation` after the context's own tokens (special tokens as the
tokenizer adds them by default; an empty context is the BOS token, else EOS), and the
score is the sum of the continuation tokens' log-probabilities. Accuracy picks the highest sum;
`acc_norm` divides it by the continuation's length in bytes, as lm-eval does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

TASK_NAME = "pydoc-continuation"
CONTEXT_WORDS = 24
CONTINUATION_WORDS = 8


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    gold: int


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith((" ", "\t")) or re.search(r"[*=\-~^]{4,}|>>>|\|", para):
                continue  # code, headings, tables
            words = para.split()
            letters = sum(c.isalpha() for c in para)
            if len(words) >= CONTEXT_WORDS + CONTINUATION_WORDS and letters > 0.7 * len(para.replace(" ", "")):
                out.append(" ".join(words))
    return out


def pydoc_questions(n: int = 100, n_choices: int = 4, seed: int = 0) -> list[Question]:
    """`n` questions (fewer if the text has fewer paragraphs), the same for the same seed."""
    paras = _paragraphs()
    rng = random.Random(seed)
    picked = rng.sample(range(len(paras)), min(n, len(paras)))
    questions = []
    for i in picked:
        words = paras[i].split()
        context = " ".join(words[:CONTEXT_WORDS])
        gold = " " + " ".join(words[CONTEXT_WORDS:CONTEXT_WORDS + CONTINUATION_WORDS])
        others = rng.sample([j for j in range(len(paras)) if j != i], n_choices - 1)
        wrong = [" " + " ".join(paras[j].split()[CONTEXT_WORDS:CONTEXT_WORDS + CONTINUATION_WORDS]) for j in others]
        at = rng.randrange(n_choices)
        choices = wrong[:at] + [gold] + wrong[at:]
        questions.append(Question(context, tuple(choices), at))
    return questions


def requests_of(questions: list[Question]) -> list[tuple[str, str]]:
    """The (context, continuation) log-likelihood requests, question-major."""
    return [(q.context, c) for q in questions for c in q.choices]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: trailing spaces of the context move to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], max_length: int = 2048, batch_size: int = 8,
                   progress: bool = True) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request.
    Requests run `batch_size` at a time, right-padded: a causal model's logits at a sequence's own
    positions do not depend on the padding after it."""
    encoded = []
    for context, continuation in requests:
        if context:
            ctx, cont = encode_pair(tokenizer, context, continuation)
        else:  # lm-eval conditions an empty context on BOS (else EOS)
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ctx, cont = [prefix], tokenizer.encode(continuation)
        encoded.append(((ctx + cont)[-(max_length + 1):][:-1], cont))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="scoring choices", disable=not progress, unit="batch"):
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, _) in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for i, (seq, cont) in enumerate(batch):
            lp = F.log_softmax(logits[i, len(seq) - len(cont):len(seq)].float(), dim=-1)
            target = torch.tensor(cont)
            out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def score_questions(questions: list[Question], lls: list[float]) -> dict:
    """acc and acc_norm (log-likelihood per byte of the continuation) from one log-likelihood per
    choice, in the order of `requests_of(questions)`."""
    i = correct = correct_norm = 0
    for q in questions:
        scores = lls[i:i + len(q.choices)]
        i += len(q.choices)
        norm = [s / len(c.encode()) for s, c in zip(scores, q.choices)]
        correct += max(range(len(scores)), key=scores.__getitem__) == q.gold
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == q.gold
    n = len(questions)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def run_pydoc_task(model, tokenizer, n: int = 100, seed: int = 0, progress: bool = True) -> dict:
    questions = pydoc_questions(n, seed=seed)
    lls = [ll for ll, _ in loglikelihoods(model, tokenizer, requests_of(questions), progress=progress)]
    return {"task": TASK_NAME, "scorer": "lowbit", **score_questions(questions, lls)}
