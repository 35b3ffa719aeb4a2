"""Standard tasks through lm-eval's Python API, where their data can be read without a network.

lm-eval's tasks fetch their data sets from the Hugging Face hub; offline (HF_DATASETS_OFFLINE=1,
set here for the duration of the call) a task loads only when its data set is already in the local
`datasets` cache. `offline_tasks` says which of the requested tasks load and why the others do
not; `run_tasks` evaluates the loadable ones with `lm_eval.simple_evaluate` on an in-memory model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_easy", "piqa", "hellaswag", "lambada_openai", "winogrande")
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


@contextlib.contextmanager
def offline():
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set while inside, restored after."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def offline_tasks(names: tuple[str, ...] = DEFAULT_TASKS) -> tuple[list[str], dict[str, str]]:
    """(tasks whose data loads offline, {task: why it does not})."""
    if not available():
        return [], {n: "lm-eval is not installed" for n in names}
    with offline():
        from lm_eval.tasks import TaskManager, get_task_dict

        manager = TaskManager()
        ok, why = [], {}
        for name in names:
            try:
                get_task_dict([name], manager)
                ok.append(name)
            except Exception as e:  # lm-eval / datasets raise many kinds for missing data
                why[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return ok, why


def run_tasks(model, tokenizer, names: list[str], limit: int | None = None, seed: int = 0) -> dict:
    """{task: {metric: value}} from lm_eval.simple_evaluate on the in-memory model (batch 1)."""
    with offline():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
        res = lm_eval.simple_evaluate(model=lm, tasks=list(names), limit=limit, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      log_samples=False)
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k}
    return out
