import os
import shutil

import pytest
import torch
from hypothesis import settings

settings.register_profile("lowbit", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("lowbit")
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_dir():
    from lowbit.models.loader import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smol(default_dir):
    """(model, tokenizer) of the bundled SmolLM2-135M in fp32; do not modify it in tests."""
    from lowbit.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir):
    """A 2-block random Llama with SmolLM2's tokenizer, saved as a HF folder (fast to quantize)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_dir).save_pretrained(path)
    return path


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.fixture(scope="session")
def eval_ids(smol):
    from lowbit.calibration import eval_windows, load_text

    return eval_windows(smol[1], load_text().evaluation, seq_len=256, max_windows=4)


@pytest.fixture(scope="session")
def digits_cnn():
    """(model, x, y): a small CNN trained a few seconds on scikit-learn's Digits (images 0-1399 for
    training, 1400+ held out); do not modify the model in tests (deepcopy it)."""
    from sklearn.datasets import load_digits
    from torch import nn

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(4):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return m.eval(), x, y
