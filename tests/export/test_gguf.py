"""GGUF: records map onto llama.cpp's blocks bit for bit (checked through the `gguf` package's own
dequantizer), a model is written with llama.cpp's metadata and read back, bad specs are refused
before anything is written. llama.cpp itself runs the files in bench/gguf_llamacpp.py."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from lowbit.core.quantize import QuantizedWeight, quantize
from lowbit.errors import LowbitError
from lowbit.export import gguf as G
from lowbit.export.gguf_blocks import LAYOUTS, decode, encode, split_products
from lowbit.spec import QuantSpec


def _weights(rows=6, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[0, :64] = 0.0  # all-zero groups and a zero super-block half
    W[1] += 0.04  # groups with a positive minimum (K-quants clamp it to 0)
    W[2, 5] = 0.9  # an outlier
    return W


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_record_maps_onto_blocks_bit_exactly(name):
    lay = LAYOUTS[name]
    qw = quantize(_weights(), lay.spec)
    data = encode(qw, lay, "w")
    assert data.shape == (6, 512 // lay.block * lay.nbytes)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])  # the gguf package's decoder
    assert np.array_equal(_bits(ref), _bits(qw.dequantize().numpy()))
    back = decode(data, lay, 6, 512)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert (back.zero is None and qw.zero is None) or torch.equal(back.zero, qw.zero)
    assert back.spec == lay.spec


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_quantized_by_the_gguf_package_read_back_exactly(name):
    qtype = gguf.GGMLQuantizationType[name]
    data = gguf.quants.quantize(_weights(seed=1).numpy(), qtype)  # llama.cpp's reference (negative d too)
    qw = decode(data, LAYOUTS[name], 6, 512)
    assert np.array_equal(_bits(gguf.quants.dequantize(data, qtype)), _bits(qw.dequantize().numpy()))
    assert np.array_equal(encode(qw, LAYOUTS[name]), data)  # and written back byte for byte


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gptq_on_the_k_grid_is_written_unchanged(name):
    from lowbit.algorithms import gptq

    W = _weights(rows=8, cols=512, seed=2)
    X = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    H = 2 * X.T @ X / X.shape[0]
    res = gptq.gptq(W, LAYOUTS[name].spec, H, act_order=True)
    data = encode(res.qweight, LAYOUTS[name], "w")
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    assert np.array_equal(_bits(ref), _bits(res.qweight.dequantize().numpy()))
    assert np.array_equal(ref, res.dequantized.numpy())  # what GPTQ optimised (it may hold -0.0 for 0)
    rtn = quantize(W, LAYOUTS[name].spec).dequantize()
    err = lambda Q: float(torch.einsum("ri,ij,rj->", W - Q, H, W - Q))  # noqa: E731
    assert err(res.dequantized) < 0.9 * err(rtn)  # GPTQ on the grid beats rounding on it


def test_split_products_refuses_values_off_the_grid():
    d, m = split_products(np.array([[0.5, 1.5, 0.0]], np.float32), 0, 63, "scales")
    assert float(d[0]) * m[0].tolist()[1] == 1.5
    with pytest.raises(ValueError, match="not a float16 factor"):
        split_products(np.array([[1.0, 1.0 / 3.0]], np.float32), 0, 63, "scales")


def test_k_record_off_its_grid_is_refused():
    spec = LAYOUTS["Q4_K"].spec
    qw = quantize(_weights(), spec)
    bad = dataclasses.replace(qw, scale=qw.scale * 1.0001)
    with pytest.raises(LowbitError, match="w: not on the GGUF Q4_K grid"):
        encode(bad, LAYOUTS["Q4_K"], "w")


def _tiny_qm(tiny_dir, type_name):
    from lowbit.export.model import QuantizedModel
    from lowbit.methods import get_method
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe
    from lowbit.spec import preset

    model, tok = load_model(str(tiny_dir))
    recipe = G.plan_recipe(Recipe(preset("W4G64"), method="rtn"), model, type=type_name)
    records = quantize_model(model, recipe, get_method("rtn"), None, progress=False)
    return QuantizedModel.from_model(model, tok, records, method="rtn", source="tiny")


def test_tiny_model_written_with_llama_metadata_and_read_back(tiny_dir, tmp_path):
    qm = _tiny_qm(tiny_dir, "Q4_K")
    out = G.write(qm, tmp_path / "tiny.gguf", type="Q4_K")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith(("pre", "model", "_id"))}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.embedding_length"] == 128 and f["llama.feed_forward_length"] == 256
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 32 and f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 49152 and len(r.fields["tokenizer.ggml.merges"].data) > 40000
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_K"  # 256 inputs: a whole super-block
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.1.ffn_up.weight"] == "Q5_0"  # 128: fallback
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output's Q6_K, rows of 128 -> Q8_0
    assert types["blk.0.attn_norm.weight"] == "F32" and len(types) == 2 * 9 + 2
    # a quantized tensor as llama.cpp reads it: the q rows in llama.cpp's rope order, values bit-exact
    t = next(t for t in r.tensors if t.name == "blk.1.attn_q.weight")
    perm = G.gguf_meta.rope_rows(qm.config, "model.layers.1.self_attn.q_proj")
    want = qm.layers["model.layers.1.self_attn.q_proj"].dequantize()[perm].numpy()
    assert np.array_equal(_bits(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)), _bits(want))
    # read back: the same records, bit for bit
    back = G.read(out)
    assert set(back.layers) == set(qm.layers)
    for name, qw in qm.layers.items():
        b = back.layers[name]
        assert b.spec == qw.spec and torch.equal(b.codes, qw.codes) and torch.equal(b.scale, qw.scale), name
    assert back.config.num_hidden_layers == 2 and back.tokenizer is not None


def test_export_from_a_checkpoint_and_inspect(tiny_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from lowbit.cli import export_cmd, inspect_cmd
    from lowbit.export import detect_format, read
    from lowbit.export import lowbit as fmt

    qm = _tiny_qm(tiny_dir, "Q4_0")
    fmt.write(qm, tmp_path / "ckpt")
    app = typer.Typer()
    export_cmd.register(app)
    inspect_cmd.register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "ckpt"), "--format", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert res.exit_code == 0, res.output
    assert detect_format(tmp_path / "m.gguf") == "gguf"
    back = read(tmp_path / "m.gguf")
    assert all(torch.equal(back.layers[n].codes, q.codes) for n, q in qm.layers.items())
    res = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf")])
    assert res.exit_code == 0, res.output
    assert "int4 sym g32" in res.output and "14 layers" in res.output


@pytest.mark.parametrize("spec, fits", [
    (QuantSpec(bits=4, symmetric=False, group_size=32), "Q4_0 = int4 sym g32, Q4_1 = int4 asym-min g32"),
    (QuantSpec(bits=4, symmetric=True, group_size=64), "Q4_0 = int4 sym g32"),
    (QuantSpec(bits=3, symmetric=False, group_size=32), "Q3_K = int3 sym g16 sb256x6b"),
    (QuantSpec(bits=7, symmetric=True, group_size=32), "Q8_0 = int8 sym g32"),
])
def test_specs_gguf_cannot_hold_are_refused_before_writing(tiny_dir, tmp_path, spec, fits):
    qm = _tiny_qm(tiny_dir, "Q4_0")
    name = "model.layers.1.mlp.down_proj"
    qm.layers[name] = quantize(torch.randn(128, 256) * 0.05, spec)
    with pytest.raises(LowbitError, match=f"{name}: GGUF cannot hold {spec.describe()}; what would fit: .*{fits}"):
        G.write(qm, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.iterdir())


def test_unknown_type_and_act_order_refused(tiny_dir, tmp_path):
    qm = _tiny_qm(tiny_dir, "Q4_0")
    with pytest.raises(LowbitError, match="type=.IQ4_NL. is not a type lowbit writes; choose one of Q8_0, Q4_0"):
        G.write(qm, tmp_path / "x.gguf", type="IQ4_NL")
    name = "model.layers.0.self_attn.o_proj"
    qm.layers[name] = dataclasses.replace(qm.layers[name], g_idx=torch.arange(128) // 32)
    with pytest.raises(LowbitError, match=f"{name}: GGUF cannot hold act-order g_idx"):
        G.write(qm, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_quantize_cli_gptq_on_the_q4_0_grid(tiny_dir, tmp_path):
    import lowbit

    out = tmp_path / "g.gguf"
    lowbit.quantize(str(tiny_dir), method="gptq", samples=2, seq_len=32, out=out, progress=False,
                    format="gguf", format_options={"type": "Q4_0"})
    back = G.read(out)
    assert {q.spec for q in back.layers.values()} == {LAYOUTS["Q4_0"].spec}
    assert all(q.codes.min() >= -8 and q.codes.max() <= 7 for q in back.layers.values())


def test_scaled_zero_record_kernels_match_the_record():
    from lowbit.nn import QuantLinear

    for name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        qw = quantize(torch.randn(64, 512) * 0.05, LAYOUTS[name].spec)
        lin = QuantLinear.from_quantized(qw)
        dense = lin.dense_weight(torch.float32)
        assert torch.allclose(dense, qw.dequantize(), atol=1e-2 * float(qw.dequantize().abs().max())), name
        x = torch.randn(3, 512)
        assert torch.allclose(lin(x), x @ qw.dequantize().T, atol=0.05, rtol=0.05), name
    assert isinstance(qw, QuantizedWeight)
