"""Lazy block loading, bf16 calibration, stacked GPTQ and swapped-layer read-back."""

import torch

from lowbit.methods.gptq import GPTQ
from lowbit.methods.stats import HessianStats
from lowbit.algorithms.hessian import BF16_MIN_FEATURES, HessianAccumulator
from lowbit.methods import get_method
from lowbit.models import load_model
from lowbit.models.lazy import is_lazy
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

IDS = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(3))
SPEC = QuantSpec(bits=3, group_size=64)


def _codes(qweights):
    return {n: qweights[n].codes.clone() for n in qweights}


def test_lazy_model_quantizes_exactly_like_an_eager_one(tiny_dir):
    lazy, _ = load_model(tiny_dir, lazy=True)
    assert is_lazy(lazy) and lazy.model.layers[1].mlp.down_proj.weight.is_meta
    eager, _ = load_model(tiny_dir)
    for name in ("rtn", "gptq"):
        a = quantize_model(lazy if name == "rtn" else load_model(tiny_dir, lazy=True)[0], Recipe(SPEC, method=name),
                           get_method(name), IDS, progress=False)
        b = quantize_model(eager if name == "rtn" else load_model(tiny_dir)[0], Recipe(SPEC, method=name),
                           get_method(name), IDS, progress=False)
        assert a.keys() == b.keys() and len(a) == 14
        for n in a:
            assert torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scale, b[n].scale), (name, n)
    assert not is_lazy(lazy)
    x = torch.randint(0, 49152, (1, 16))
    assert torch.equal(lazy(input_ids=x).logits, eager(input_ids=x).logits)


def _mappings_of(path) -> int:
    import gc
    import pathlib

    gc.collect()
    maps = pathlib.Path("/proc/self/maps")
    return sum(str(path) in line for line in maps.read_text().splitlines()) if maps.exists() else 0


def test_lazy_loading_keeps_no_view_of_the_weight_file(tiny_dir):
    """Everything a lazy load keeps is a copy: a view of the file mapping keeps every page read
    through it resident for the whole run."""
    from pathlib import Path

    weights = Path(tiny_dir) / "model.safetensors"
    before = _mappings_of(weights)
    model, _ = load_model(tiny_dir, lazy=True)
    quantize_model(model, Recipe(SPEC, method="rtn"), get_method("rtn"), None, progress=False)
    assert _mappings_of(weights) == before


def test_embeddings_wait_on_disk_during_the_block_loop(tiny_dir, monkeypatch):
    """A lazy model's embeddings are parked on meta between capture and the end (also when the
    loop fails), then read back bit-identical, still tied to the head when they were."""
    import lowbit.pipeline as pipeline

    eager, _ = load_model(tiny_dir)
    model, _ = load_model(tiny_dir, lazy=True)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    seen = []
    real = pipeline.materialize_block

    def spy(m, i):
        seen.append((m.model.embed_tokens.weight.is_meta, m.lm_head.weight.is_meta))
        real(m, i)

    monkeypatch.setattr(pipeline, "materialize_block", spy)
    quantize_model(model, Recipe(SPEC, method="gptq"), get_method("gptq"), IDS, progress=False)
    assert seen == [(True, tied)] * 2
    assert not model.model.embed_tokens.weight.is_meta
    assert torch.equal(model.model.embed_tokens.weight, eager.model.embed_tokens.weight)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    failing, _ = load_model(tiny_dir, lazy=True)
    monkeypatch.setattr(pipeline, "materialize_block",
                        lambda m, i: (_ for _ in ()).throw(RuntimeError("stop")) if i == 1 else real(m, i))
    try:
        quantize_model(failing, Recipe(SPEC, method="rtn"), get_method("rtn"), None, progress=False)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the loop should have failed")
    assert torch.equal(failing.model.embed_tokens.weight, eager.model.embed_tokens.weight)


def test_swapped_layers_read_back_bit_identical(tiny_dir):
    kept = quantize_model(load_model(tiny_dir)[0], Recipe(SPEC, method="gptq"), get_method("gptq"), IDS,
                          progress=False, swap=False)
    swapped = quantize_model(load_model(tiny_dir)[0], Recipe(SPEC, method="gptq"), get_method("gptq"), IDS,
                             progress=False, swap=True)
    for n in kept:
        assert torch.equal(kept[n].codes, swapped[n].codes) and torch.equal(kept[n].scale, swapped[n].scale), n


def test_bf16_calibration_matches_fp32_calibration_closely(tiny_dir):
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(4))  # full-rank Hessians
    errs = {}
    for dtype in (None, torch.bfloat16):
        m = get_method("gptq")
        model = load_model(tiny_dir)[0]
        done = quantize_model(model, Recipe(SPEC, method="gptq"), m, ids, progress=False, calib_dtype=dtype)
        errs[dtype] = {n: qw.error for n, qw in done.items()}
        # swapped per group (bf16 working copy) or after the block's forward (fp32: no copy)
        assert all(isinstance(model.get_submodule(n), QuantLinear) for n in done)
    for n, e in errs[None].items():
        assert abs(errs[torch.bfloat16][n] - e) <= 0.1 * e + 1e-4, (n, e, errs[torch.bfloat16][n])


def test_bf16_hessian_pieces_stay_close_to_float32():
    d = BF16_MIN_FEATURES + 128  # wide enough for the bf16 products
    x = (torch.randn(2048, d) * torch.logspace(-1, 1, d)).bfloat16()  # exact in bf16
    a, b = HessianAccumulator(d), HessianAccumulator(d)
    a.add(x)
    b.add(x.float())
    rel = (a.H - b.H).norm() / b.H.norm()
    assert rel < 2e-3


def test_stacked_gptq_equals_separate_runs():
    torch.manual_seed(0)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3
    ws = [torch.randn(96, 128), torch.randn(32, 128), torch.randn(32, 128)]
    pool = []
    stats = [HessianStats(pool, f"l{i}", 128) for i in range(3)]
    for s in stats:
        s.add(x)  # the same tensor: one shared accumulator
    assert stats[0].acc is stats[1].acc is stats[2].acc
    stacked = GPTQ().quantize_group(["q", "k", "v"], ws, [SPEC] * 3, stats)
    separate = [GPTQ().quantize_linear(n, w, SPEC, s) for n, w, s in zip("qkv", ws, stats)]
    for a, b in zip(stacked, separate):
        same = (a.codes == b.codes).float().mean()
        assert same > 0.999 and torch.allclose(a.scale, b.scale)
