import json

import pytest

from lowbit.calibration import calibration_batches, load_text, split_text
from lowbit.calibration.text import load_documents
from lowbit.errors import LowbitError


def test_pydoc_split_is_deterministic_and_disjoint():
    a, b = load_text(), load_text()
    assert a == b
    assert len(a.calibration) > 100_000 and len(a.evaluation) > 50_000
    cal_paras = set(p.strip() for p in a.calibration.split("\n\n") if len(p) > 80)
    ev_paras = set(p.strip() for p in a.evaluation.split("\n\n") if len(p) > 80)
    assert len(ev_paras) > 200 and not cal_paras & ev_paras


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(6)))
    assert load_documents(str(tmp_path / "a.txt")) == ["alpha " * 100]
    assert len(load_documents(str(tmp_path / "b.jsonl"))) == 6
    assert len(load_documents(str(tmp_path))) == 7
    s = split_text(load_documents(str(tmp_path / "a.txt")), 0.3)
    assert s.calibration + s.evaluation == "alpha " * 100


def test_bad_jsonl_line_is_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(LowbitError, match=r"x.jsonl:2 has no 'text'"):
        load_documents(str(f))


def test_calibration_windows_deterministic(smol):
    text = load_text().calibration
    a = calibration_batches(smol[1], text, 4, 64, seed=1)
    b = calibration_batches(smol[1], text, 4, 64, seed=1)
    assert a.shape == (4, 64) and (a == b).all()


def test_benchmark_text_falls_back_to_pydoc(tmp_path):
    from lowbit.calibration import load_text_or_pydoc

    name, split = load_text_or_pydoc(str(tmp_path / "missing.txt"))
    assert name == "pydoc" and split == load_text("pydoc")
    (tmp_path / "a.txt").write_text("word " * 400)
    assert load_text_or_pydoc(str(tmp_path / "a.txt"))[0] == str(tmp_path / "a.txt")
