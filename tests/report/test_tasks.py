"""lowbit's own multiple-choice task: deterministic questions, scoring, and equality with lm-eval's
log-likelihood API on the same requests."""

import os

import pytest

from lowbit.eval.tasks import Question, pydoc_questions, requests_of, score_questions


def test_questions_are_deterministic_and_well_formed():
    a, b, c = pydoc_questions(20, seed=0), pydoc_questions(20, seed=0), pydoc_questions(20, seed=1)
    assert a == b and a != c and len(a) == 20
    for q in a:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4 and 0 <= q.gold < 4
        assert all(ch.startswith(" ") and not q.context.endswith(" ") for ch in q.choices)
    assert len({q.gold for q in a}) > 1  # the answer's position varies
    assert requests_of(a[:2]) == [(a[0].context, ch) for ch in a[0].choices] + [(a[1].context, ch) for ch in a[1].choices]


def test_score_questions_hand_case():
    qs = [Question("c", (" a", " bbbb"), 1), Question("d", (" x", " y"), 0)]
    # q1: raw picks " a" (-2 > -3) but per byte " bbbb" wins (-3/5 > -2/2); q2: " x" both ways
    res = score_questions(qs, [-2.0, -3.0, -1.0, -5.0])
    assert res == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


@pytest.mark.slow
def test_own_scoring_equals_lm_eval_loglikelihood_api(smol, monkeypatch):
    """The same (context, continuation) requests through lm-eval's HFLM.loglikelihood (its Python
    API, batch 1) and through lowbit's scorer (batched, right-padded) give the same numbers."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lowbit.eval.tasks import loglikelihoods

    model, tok = smol
    requests = requests_of(pydoc_questions(2, seed=3)) + [("", " The list type"), ("Trailing space ", "kept")]
    ours = loglikelihoods(model, tok, requests, batch_size=4, progress=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    theirs = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                               for i, r in enumerate(requests)], disable_tqdm=True)
    assert len(ours) == len(theirs) == len(requests)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, theirs):
        assert ll == pytest.approx(ll_ref, abs=2e-4, rel=1e-5)
        assert greedy == greedy_ref
    # the accuracy lm-eval's numbers give equals ours
    qs = pydoc_questions(2, seed=3)
    n = sum(len(q.choices) for q in qs)
    assert score_questions(qs, [x for x, _ in ours[:n]]) == score_questions(qs, [x for x, _ in theirs[:n]])


@pytest.mark.slow
def test_lm_eval_tasks_without_local_data_are_reported_unavailable():
    """Offline, lm-eval's tasks whose data set is not in the local cache do not load, and say why
    (the report then falls back to lowbit's own task); the environment is restored after."""
    pytest.importorskip("lm_eval")
    from lowbit.eval.lm_eval_tasks import offline_tasks

    before = os.environ.get("HF_DATASETS_OFFLINE")
    ok, why = offline_tasks(("arc_easy", "no_such_task_xyz"))
    assert "no_such_task_xyz" in why and "no_such_task_xyz" not in ok
    assert ok == [] or ok == ["arc_easy"]  # arc_easy only where its data set happens to be cached
    assert ("arc_easy" in why) != ("arc_easy" in ok)
    assert os.environ.get("HF_DATASETS_OFFLINE") == before
