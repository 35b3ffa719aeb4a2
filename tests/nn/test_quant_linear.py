"""QuantLinear: every path matches x @ dequantize().T, shrinks memory, and round-trips exactly."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import QuantSpec
from lowbit.core import QuantizedWeight, quantize
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear, replace_linear
from lowbit.nn import int4_layout

N, K = 192, 768

SPECS = {
    "int4_sym_g32": (QuantSpec(4, "int", True, "group", 32), "int4"),
    "int4_sym_g64": (QuantSpec(4, "int", True, "group", 64), "int4"),
    "int4_sym_g128": (QuantSpec(4, "int", True, "group", 128), "int4"),
    "int4_sym_g256": (QuantSpec(4, "int", True, "group", 256), "int4"),
    "int4_asym_g32": (QuantSpec(4, "int", False, "group", 32), "int4"),
    "int4_asym_g64": (QuantSpec(4, "int", False, "group", 64), "int4"),
    "int4_asym_g128": (QuantSpec(4, "int", False, "group", 128), "int4"),
    "int4_asym_g256": (QuantSpec(4, "int", False, "group", 256), "int4"),
    "int4_sym_channel": (QuantSpec(4, "int", True, "channel"), "int4"),
    "int8_channel": (QuantSpec(8, "int", True, "channel"), "int8"),
    "int8_tensor": (QuantSpec(8, "int", True, "tensor"), "int8"),
    "int8_asym_g64": (QuantSpec(8, "int", False, "group", 64), "packed"),
    "int2_asym_g64": (QuantSpec(2, "int", False, "group", 64), "packed"),
    "int3_asym_g64": (QuantSpec(3, "int", False, "group", 64), "packed"),
    "int3_sym_channel": (QuantSpec(3, "int", True, "channel"), "packed"),
    "int5_sym_g64": (QuantSpec(5, "int", True, "group", 64), "packed"),
    "int6_asym_g128": (QuantSpec(6, "int", False, "group", 128), "packed"),
    "int7_sym_g32": (QuantSpec(7, "int", True, "group", 32), "packed"),
    "nf4_g64": (QuantSpec(4, "nf4", True, "group", 64), "packed"),
    "fp4_g32": (QuantSpec(4, "fp4", True, "group", 32), "packed"),
    "fp8_e4m3": (QuantSpec(8, "fp8_e4m3", True, "channel"), "packed"),
    "fp8_e5m2": (QuantSpec(8, "fp8_e5m2", True, "channel"), "packed"),
}


def _weight(seed=0, n=N, k=K):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def built():
    w, b = _weight(), torch.randn(N, generator=torch.Generator().manual_seed(1))
    out = {}
    for key, (spec, _) in SPECS.items():
        qw = quantize(w, spec)
        out[key] = (qw, b, QuantLinear.from_quantized(qw, b, compile_dequant=False))
    return out


@pytest.mark.parametrize("key", list(SPECS))
def test_path_and_forward_matches_dequantized_reference(built, key):
    qw, b, m = built[key]
    assert m.path == SPECS[key][1]
    ref_w = qw.dequantize()
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 7, 100):  # kernel path for few rows, dequant + bf16 GEMM for many
        x = torch.randn(2, rows, K, generator=gen) if rows == 7 else torch.randn(rows, K, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            xi = x.to(dtype)
            y = m(xi)
            assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
            ref = xi.float() @ ref_w.T + b
            # bf16 activations/weights: ~2**-8 relative rounding on each operand
            assert _rel(y, ref) < 1e-2, (key, rows, dtype)


@pytest.mark.parametrize("key", list(SPECS))
def test_memory_shrinks(built, key):
    spec = SPECS[key][0]
    _, _, m = built[key]
    code_bytes = N * K * spec.bits / 8
    # packed codes are exactly bits/8 bytes per weight; side data is the rest
    assert m.qweight.numel() * m.qweight.element_size() == pytest.approx(code_bytes, rel=0.01)
    side_bits = m.bits_per_weight() - spec.bits
    assert 0 <= side_bits <= 32 / (spec.group_size or 256) + 0.03  # 16-bit scale + zero per (kernel) group
    assert m.nbytes() < N * K * 4 * (spec.bits + 3.1) / 32  # far below the fp32 weight


@pytest.mark.parametrize("key", ["int4_sym_g64", "int4_asym_g128", "int8_channel", "int3_asym_g64", "nf4_g64",
                                 "fp8_e5m2", "int6_asym_g128"])
def test_record_file_round_trip_rebuilds_identical_kernels(built, tmp_path, key):
    """The record is the portable form: written through lowbit's layer layout and read back it
    is bit-identical and rebuilds a QuantLinear with identical buffers and outputs."""
    from lowbit.export.lowbit import layer_tensors, read_layer

    qw, b, m = built[key]
    save_file(layer_tensors("l", qw), tmp_path / "l.safetensors")
    back = read_layer(load_file(tmp_path / "l.safetensors"), "l", qw.spec, qw.shape)
    assert torch.equal(back.codes, qw.codes) and back.codes.dtype == qw.codes.dtype
    assert torch.equal(back.scale, qw.scale) and back.scale.dtype == torch.float16
    assert (back.zero is None) == (qw.zero is None) and (qw.zero is None or torch.equal(back.zero, qw.zero))
    m2 = QuantLinear.from_quantized(back, b, compile_dequant=False)
    assert m2.path == m.path
    for name, buf in m.named_buffers():
        assert torch.equal(buf, dict(m2.named_buffers())[name]), name
    x = torch.randn(3, K)
    assert torch.equal(m(x), m2(x))


def test_w4_g64_sym_holds_one_copy_of_its_parameters(built):
    """4-bit codes + the kernel's bf16 scale-and-zero table: 4.5 bits per weight in memory."""
    _, _, m = built["int4_sym_g64"]
    assert m.bits_per_weight() == pytest.approx(4.5)
    assert m.scale is None and m.zero is None


def test_g_idx_act_order_path():
    w = _weight(3)
    spec = QuantSpec(4, "int", True, "group", 64)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(4))
    g_idx = (torch.arange(K) // 64)[perm].to(torch.int32)  # column -> group, not contiguous
    base = quantize(w, spec)
    scale = base.scale
    from lowbit.core import quantize_codes
    codes = quantize_codes(w, scale, None, spec, g_idx)
    qw = QuantizedWeight(codes, scale, None, spec, g_idx)
    m = QuantLinear.from_quantized(qw, compile_dequant=False)
    assert m.path == "packed"
    for rows in (1, 50):
        x = torch.randn(rows, K)
        assert _rel(m(x), x @ qw.dequantize().T) < 1e-2
    assert torch.equal(m.g_idx, g_idx)


def test_int4_layout_matches_kernel():
    """Our unpack of torch's int4 CPU layout agrees with the kernel itself (identity input)."""
    for n, k in [(64, 64), (576, 128), (192, 256)]:
        q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
        packed = int4_layout.pack(q)
        assert torch.equal(int4_layout.unpack(packed, n, k).to(torch.int32), q)
        sz = torch.zeros(k // 32, n, 2, dtype=torch.bfloat16)
        sz[..., 0] = 1
        sz[..., 1] = 8
        eye = torch.eye(k, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 32, sz)
        assert torch.equal(out.t().to(torch.int32), q)


def test_odd_shapes_fall_back_to_packed():
    spec = QuantSpec(4, "int", True, "group", 32)
    for n, k in [(48, 64), (100, 96)]:  # N not a multiple of 64
        qw = quantize(_weight(5, n, k), spec)
        m = QuantLinear.from_quantized(qw, compile_dequant=False)
        assert m.path == "packed"
        x = torch.randn(2, k)
        assert _rel(m(x), x @ qw.dequantize().T) < 1e-2


def test_lm_head_shape():
    n, k = 49152, 576
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.02
    qw = quantize(w, QuantSpec(4, "int", True, "group", 64))
    m = QuantLinear.from_quantized(qw, compile_dequant=False)
    assert m.path == "int4"
    assert m.bits_per_weight() == pytest.approx(4.5)
    wd = qw.dequantize()
    x = torch.randn(1, 1, k)
    assert _rel(m(x), x @ wd.T) < 1e-2
    m.kernel_max_rows = 0  # the dequant + bf16 GEMM path, without a 49152 x 64 test input
    assert _rel(m(x), x @ wd.T) < 1e-2


def test_compiled_dequant_matches_eager(built):
    for key in ("int3_asym_g64",):  # one compile keeps the suite fast; bench/ exercises the rest
        _, _, m = built[key]
        eager = m.dense_weight(torch.float32)
        m.compile_dequant = True
        try:
            assert torch.equal(m.dense_weight(torch.float32), eager)
        finally:
            m.compile_dequant = False


def test_replace_linear():
    model = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(N, 64)))
    lin = model[1][1]
    qw = quantize(lin.weight.detach(), QuantSpec(8, "int", True, "channel"))
    q = QuantLinear.from_quantized(qw, lin.bias.detach(), compile_dequant=False)
    old = replace_linear(model, "1.1", q)
    assert old is lin and model[1][1] is q
    with pytest.raises(LowbitError, match="nope"):
        replace_linear(model, "1.nope", q)


def test_bad_input_names_the_problem():
    spec = QuantSpec(4, "int", True, "group", 128)
    with pytest.raises(LowbitError, match="model.layers.0.mlp.up_proj"):
        QuantLinear(576, 1536, spec, name="model.layers.0.mlp.up_proj")
    qw = quantize(_weight(), QuantSpec(4, "int", False, "group", 64))
    qw.zero = None
    with pytest.raises(LowbitError, match="zero point"):
        QuantLinear.from_quantized(qw)


def test_dtype_casts_leave_quantization_parameters_alone(built):
    qw, b, m = built["int3_asym_g64"]
    before = {n: t.clone() for n, t in m.named_buffers() if n != "bias"}
    m.to(torch.bfloat16)
    try:
        for n, t in m.named_buffers():
            if n == "bias":
                assert t.dtype == torch.bfloat16
            else:
                assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n
    finally:
        m.float()
