"""Trainer: learns, is deterministic, resumes after a kill to the same adapters, refuses another
model's checkpoint; data: chat examples train only on answers; bad data is one clear error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.errors import LowbitError
from lowbit.qlora import checkpoint
from lowbit.qlora.adapt import LoraConfig, adapt
from lowbit.qlora.data import IGNORE, load_dataset
from lowbit.qlora.trainer import TrainConfig, perplexity, train

SRC = str(Path(__file__).resolve().parents[2] / "src")
LORA = LoraConfig(r=4, alpha=8, dropout=0.1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return path


def _run(tiny_dir, text_file, out, steps, lora=LORA):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ds = load_dataset(str(text_file), tok, seq_len=32, max_eval_windows=8)
    adapted = adapt(model, lora)
    m = train(adapted, ds.train, ds.eval, out, TrainConfig(steps=steps, batch_size=2, lr=2e-3, warmup=1, save_every=2))
    return adapted, m, ds


def test_trains_and_is_deterministic(tiny_dir, text_file, tmp_path):
    a, m, ds = _run(tiny_dir, text_file, tmp_path / "a", 6)
    b, m2, _ = _run(tiny_dir, text_file, tmp_path / "b", 6)
    assert m["losses"] == m2["losses"]
    for k, v in a.adapter_state().items():
        assert torch.equal(v, b.adapter_state()[k])
    assert m["eval_ppl"] == pytest.approx(perplexity(a.model, ds.eval), rel=1e-6)
    assert m["tokens_per_s"] > 0 and (tmp_path / "a" / checkpoint.FOLDER / checkpoint.STATE).is_file()


def test_resume_after_kill_gives_the_uninterrupted_adapters(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-c", "from lowbit.cli import main; main()", "finetune", str(tiny_dir), "--data", str(text_file), "--steps", "400",
           "--seq-len", "32", "--batch-size", "2", "--lr", "2e-3", "--warmup", "1", "--save-every", "2",
           "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--qlora", "--eval-windows", "8", "--threads", "1",
           "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / checkpoint.FOLDER / checkpoint.STATE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.2)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert not finished, err[-2000:]
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 400
    steps = killed_at + 4
    lora = LoraConfig(r=4, alpha=8, dropout=0.1)
    resumed = adapt(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), lora)
    fresh = adapt(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), lora)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ds = load_dataset(str(text_file), tok, seq_len=32, max_eval_windows=8)
    cfg = TrainConfig(steps=400, batch_size=2, lr=2e-3, warmup=1, save_every=2)  # the killed run's
    m = train(resumed, ds.train, None, out, cfg, until=steps)
    assert m["resumed_from"] == killed_at
    m_ref = train(fresh, ds.train, None, tmp_path / "ref", cfg, until=steps)  # uninterrupted
    assert m["losses"][-4:] == m_ref["losses"][-4:]
    for k, v in fresh.adapter_state().items():
        assert torch.equal(v, resumed.adapter_state()[k]), k


def test_refuses_checkpoint_of_another_model(tiny_dir, text_file, tmp_path, default_dir):
    _run(tiny_dir, text_file, tmp_path / "a", 2)
    other = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    adapted = adapt(other, LORA)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ds = load_dataset(str(text_file), tok, seq_len=32, max_eval_windows=4)
    with pytest.raises(LowbitError, match="checkpoint of another model"):
        train(adapted, ds.train, None, tmp_path / "a", TrainConfig(steps=4, batch_size=2))


def test_chat_jsonl_masks_prompts(tmp_path, default_dir):
    tok = AutoTokenizer.from_pretrained(default_dir)
    path = tmp_path / "chat.jsonl"
    rows = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(10)]
    rows[1] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    rows[2] = {"prompt": "2+2?", "response": "4"}
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(str(path), tok, seq_len=64, eval_fraction=0.2)
    assert ds.kind == "chat" and len(ds.train) == 8 and len(ds.eval) == 2
    first = ds.train.labels[0]
    kept = tok.decode(first[first != IGNORE])
    assert "The number is 0." in kept and "Say the number" not in kept


@pytest.mark.parametrize("content, match", [("", "empty file"), ('{"body": "x"}\n', "has no text field"),
                                             ('{"instruction": "x"}\n', "needs an 'output' field")])
def test_bad_data(tmp_path, default_dir, content, match):
    tok = AutoTokenizer.from_pretrained(default_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LowbitError, match=match):
        load_dataset(str(path), tok)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    ids = torch.randint(0, 1000, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        adapted = adapt(model, LoraConfig(r=4, alpha=8, dropout=0.0, gradient_checkpointing=ckpt))
        with torch.no_grad():
            for m in adapted.lora_modules().values():
                m.lora_B.weight.fill_(0.01)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-3, atol=1e-6), n
