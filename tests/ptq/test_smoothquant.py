"""SmoothQuant: the fold is exact in float (outputs equal before quantization), for fixed and
searched alphas; the alpha search picks the least output error and beats no smoothing on
outlier channels; bad alphas named."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import int8
from lowbit.errors import LowbitError
from lowbit.ptq.smooth_search import ALPHAS, fake_int8_input, search_alpha, smoothed_error
from lowbit.ptq.smoothquant import smooth, smooth_scales


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    m = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # outlier channels in the norms, as real LLMs have
        for layer in m.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 30.0
            layer.post_attention_layernorm.weight[[5]] = 20.0
    return m


def _batches(n=3, seq=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (1, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("alpha,dynamic", [(0.8, True), ("auto", True), ("auto", False)])
def test_fold_is_exact_in_float(alpha, dynamic):
    model = _tiny_llama()
    ids = _batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    sm = copy.deepcopy(model)
    alphas: dict = {}
    scales = smooth(sm, _batches(), alpha, dynamic=dynamic, alphas=alphas)
    assert len(scales) == 2 * 3  # both norms and up -> down in each block
    assert len(alphas) == (6 if alpha == "auto" else 0)
    assert all(a in ALPHAS for a in alphas.values())
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())
    with torch.no_grad():
        out = sm(ids).logits
    assert (out - ref).abs().max() < 1e-9 * ref.abs().max()


def test_search_beats_no_smoothing_on_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, [2, 40]] *= 80  # two outlier channels
    w = [torch.randn(96, 64, generator=g) * 0.05, torch.randn(32, 64, generator=g) * 0.05]
    amax = x.abs().amax(0)
    for dynamic in (True, False):
        best, errs = search_alpha(x, w, amax, dynamic)
        assert errs[best] == min(errs.values())
        assert errs[best] < 0.25 * errs[0.0]  # alpha 0 = no migration of the outliers
        s = smooth_scales(amax, torch.cat(w).abs().amax(0), best)
        assert smoothed_error(x, w, s, dynamic, None if dynamic else amax) == pytest.approx(errs[best])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_fake_int8_input_within_half_step(m, k, scale, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = int8.quantize_per_token(x)
    assert torch.equal(fake_int8_input(x, True), q.float() * s)
    step = float(x.abs().amax() / 127)
    assert float((fake_int8_input(x, False) - x).abs().max()) <= 0.5 * step * (1 + 1e-5) + 1e-30


def test_bad_alpha_named():
    model = _tiny_llama()
    with pytest.raises(LowbitError, match="alpha"):
        smooth(model, _batches(1), "best")
    with pytest.raises(LowbitError, match="alpha"):
        smooth(model, _batches(1), 1.5)


def test_clip_search_trades_rare_outliers_for_a_finer_grid():
    from lowbit.ptq.smooth_search import search_clip

    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    w = [torch.randn(48, 64, generator=g) * 0.05]
    c_plain, errs = search_clip(x, w, x.abs().amax())
    assert errs[c_plain] == min(errs.values()) and errs[c_plain] <= errs[1.0]
    x[0, 5] = 100.0  # one value far outside: a range that covers it leaves the rest a coarse grid
    best, errs = search_clip(x, w, x.abs().amax())
    assert best < 1.0 and errs[best] == min(errs.values()) and errs[best] < 0.9 * errs[1.0]
    with pytest.raises(LowbitError, match="clip factors"):
        search_clip(x, w, x.abs().amax(), clips=(1.5,))


def test_clip_search_on_a_model_shrinks_ranges_and_only_for_static_per_tensor():
    from lowbit.nn.int8_linear import Int8Linear
    from lowbit.ptq.llm import quantize_llm

    with pytest.raises(LowbitError, match="clip_search applies to static"):
        quantize_llm(_tiny_llama(), "w8a8-dynamic", None, clip_search=True)
    ids = torch.cat(_batches())
    plain = quantize_llm(_tiny_llama().float(), "w8a8-static", ids, progress=False)
    clipped = quantize_llm(_tiny_llama().float(), "w8a8-static", ids, clip_search=True, progress=False)
    scales = [(a.input_scale, b.input_scale) for a, b in zip(plain.modules(), clipped.modules())
              if isinstance(a, Int8Linear)]
    assert len(scales) == 14 and all(float(b) <= float(a) for a, b in scales)
    assert torch.isfinite(clipped(ids[:1]).logits).all()


@pytest.mark.parametrize("alpha", [{"qkv": 0.8, "o": 0.5, "gate_up": 0.8, "down": 0.6}, {"o": "auto"}])
def test_v_to_o_with_grouped_query_attention_is_exact_in_float(alpha):
    """v_proj -> o_proj under GQA (4 query heads, 2 kv heads): each kv channel's scale is shared by
    the query heads reading it, so the smoothed model computes the same logits (float64)."""
    model = _tiny_llama()
    ids = _batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    sm = copy.deepcopy(model)
    scales = smooth(sm, _batches(), alpha, dynamic=False)
    v = [n for n in scales if n.endswith("v_proj")]
    assert len(v) == 2 and len(scales) == (8 if "qkv" in alpha else 2)
    hd = 64 // 4
    for n in v:
        s = scales[n]
        assert s.shape == (2 * hd,) and not torch.allclose(s, torch.ones_like(s))
        blk = n.rsplit(".", 1)[0]
        w0, w1 = model.get_submodule(f"{blk}.o_proj").weight, sm.get_submodule(f"{blk}.o_proj").weight
        ratio = (w1 / w0)[0].reshape(4, hd)  # query heads 0, 1 read kv head 0; 2, 3 read kv head 1
        assert torch.allclose(ratio[0], ratio[1]) and torch.allclose(ratio[2], ratio[3])
        assert torch.allclose(ratio[0], s[:hd].double()) and torch.allclose(ratio[2], s[hd:].double())
    with torch.no_grad():
        out = sm(ids).logits
    assert (out - ref).abs().max() < 1e-9 * ref.abs().max()


def test_v_to_o_smoothing_lowers_the_static_int8_error_of_o_proj():
    """An outlier head-dim channel in V (every query head of its kv group carries it into o_proj's
    input): smoothing v -> o shrinks the per-tensor static int8 error of o_proj's output."""
    from lowbit.ptq.smooth_search import fake_int8_input, fake_int8_weight
    from lowbit.ptq.smoothquant import input_absmax

    model = _tiny_llama().float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[[3, 20]] *= 40.0
    names = [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]

    def o_error(m):
        errs = []

        def on_input(name, x):
            x = x.reshape(-1, x.shape[-1])
            w = m.get_submodule(name).weight.detach()
            errs.append(float((fake_int8_input(x, False) @ fake_int8_weight(w).t() - x @ w.t()).pow(2).mean()))

        from lowbit.ptq.calibrate import watch_inputs
        watch_inputs(m, names, _batches(), on_input)
        return sum(errs)

    sm = copy.deepcopy(model)
    smooth(sm, _batches(), {"o": 0.5}, dynamic=False)
    assert o_error(sm) < 0.3 * o_error(model)
    a0, a1 = input_absmax(model, names, _batches()), input_absmax(sm, names, _batches())
    assert all(float(a1[n].amax() / a1[n].median()) < 0.5 * float(a0[n].amax() / a0[n].median()) for n in names)


def test_alphas_per_mapping_parsed_and_checked():
    from lowbit.ptq.smoothquant import alpha_for, parse_alpha

    assert parse_alpha("qkv=0.8, o=0.5,down=auto") == {"qkv": 0.8, "o": 0.5, "down": "auto"}
    assert parse_alpha("0.7") == 0.7 and parse_alpha("auto") == "auto" and parse_alpha(None) is None
    assert alpha_for(0.7, "o") is None and alpha_for(0.7, "down") == 0.7 and alpha_for(0.7, "down", False) is None
    assert alpha_for({"o": 0.5}, "qkv") is None and alpha_for({"o": 0.5}, "o") == 0.5
    for bad, msg in (("qkv=0.8,ffn=0.5", "unknown mapping 'ffn'"), ("o=1.5", r"\[0, 1\]"), ("o=best", "'best'"),
                     ("lots", "--smoothquant 'lots'")):
        with pytest.raises(LowbitError, match=msg):
            parse_alpha(bad)
