"""QuantEmbedding (--embed-bits 8): lookups equal the dequantized int8 table, the error stays
within half a step, checkpoints round-trip bit-identical, formats get the dequantized table."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.api import embed_spec, make_recipe, quantize_to
from lowbit.errors import LowbitError
from lowbit.nn.quant_embedding import QuantEmbedding, quantize_embedding
from lowbit.spec import QuantSpec


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 4), group_size=st.sampled_from([8, 32]),
       per_row=st.booleans(), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_lookup_is_the_dequantized_table_within_half_a_step(rows, groups, group_size, per_row, seed, scale):
    g = torch.Generator().manual_seed(seed)
    dim = groups * group_size
    table = torch.nn.Embedding(rows, dim)
    table.weight.data = torch.randn(rows, dim, generator=g) * scale
    spec = QuantSpec(bits=8, granularity="channel", group_size=None) if per_row else \
        QuantSpec(bits=8, granularity="group", group_size=group_size)
    qw = quantize_embedding(table, spec)
    mod = QuantEmbedding.from_quantized(qw)
    ids = torch.randint(0, rows, (3, 5), generator=g)
    got = mod(ids)
    full = qw.dequantize()
    assert torch.equal(got, full[ids])  # only the rows looked up are dequantized, to the same values
    step = qw.scale.float().repeat_interleave(dim // qw.scale.shape[1], dim=1)
    assert ((full - table.weight).abs() <= step / 2 * (1 + 1e-3) + 1e-30).all()
    back = mod.record()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)


def test_bad_specs_and_ids_are_refused():
    table = torch.nn.Embedding(10, 64)
    with pytest.raises(LowbitError, match="symmetric 8-bit"):
        quantize_embedding(table, QuantSpec(bits=4, granularity="group", group_size=32))
    with pytest.raises(LowbitError, match="does not divide"):
        quantize_embedding(table, QuantSpec(bits=8, granularity="group", group_size=48))
    with pytest.raises(LowbitError, match="--embed-bits 8"):
        embed_spec(4)
    mod = QuantEmbedding.from_quantized(quantize_embedding(table, embed_spec(8)))
    with pytest.raises(IndexError):
        mod(torch.tensor([10]))


def test_tied_head_must_be_quantized_too(tiny_dir, tmp_path):
    with pytest.raises(LowbitError, match="lm_head shares model.embed_tokens.*--head-bits 8"):
        quantize_to(str(tiny_dir), tmp_path / "q", make_recipe(method="rtn", bits=4, embed_bits=8), progress=False)
    assert not (tmp_path / "q").exists()


def test_checkpoint_round_trip_and_float_formats(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.export import read
    from lowbit.models import load_model

    recipe = make_recipe(method="rtn", bits=4, group_size=64, head_bits=8, embed_bits=8)
    model, _ = quantize_to(str(tiny_dir), tmp_path / "q", recipe, progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    loaded, _ = load_model(str(tmp_path / "q"))
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert torch.equal(loaded.model.embed_tokens.codes, model.model.embed_tokens.codes)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    fp, _ = load_model(str(tiny_dir))
    table = model.model.embed_tokens.weight
    assert 0 < (table - fp.model.embed_tokens.weight).abs().max() <= model.model.embed_tokens.scale.float().max() / 2 * 1.001
    # a format whose embeddings are floating point gets the int8 table's values, read by transformers
    from lowbit.export import compressed_tensors

    compressed_tensors.write(read(tmp_path / "q"), tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.equal(theirs.model.embed_tokens.weight.float(), table)


def test_recipe_embed_key(tmp_path):
    from lowbit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("method: rtn\nbits: 4\nhead: {bits: 8, granularity: channel}\nembed: {bits: 8, group_size: 32}\n")
    r = load_recipe(path)
    assert r.embed_spec == embed_spec(8) and r.head_spec.bits == 8
    path.write_text("method: rtn\nembed: {bitz: 8}\n")
    with pytest.raises(LowbitError, match="'embed' must be a mapping of spec keys.*'bitz'"):
        load_recipe(path)
