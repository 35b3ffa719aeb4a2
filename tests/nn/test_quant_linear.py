"""QuantLinear: the compiled kernels and the pure-torch path match x @ dequantize().T on every layout,
agree with each other within bf16 rounding, hold one packed copy, and round-trip exactly."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import QuantSpec
from lowbit.core import QuantizedWeight, quantize
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear, replace_linear
from lowbit.nn import cpu_kernels

N, K = 192, 768

HAS_CPU = cpu_kernels.load() is not None
CPU = "cpu" if HAS_CPU else "torch"

SPECS = {  # spec, the kernel QuantLinear picks when the compiled kernels are built
    "int4_sym_g32": (QuantSpec(4, "int", True, "group", 32), CPU),
    "int4_sym_g64": (QuantSpec(4, "int", True, "group", 64), CPU),
    "int4_sym_g128": (QuantSpec(4, "int", True, "group", 128), CPU),
    "int4_sym_g256": (QuantSpec(4, "int", True, "group", 256), CPU),
    "int4_asym_g32": (QuantSpec(4, "int", False, "group", 32), CPU),
    "int4_asym_g64": (QuantSpec(4, "int", False, "group", 64), CPU),
    "int4_asym_g128": (QuantSpec(4, "int", False, "group", 128), CPU),
    "int4_sym_channel": (QuantSpec(4, "int", True, "channel"), CPU),
    "int8_channel": (QuantSpec(8, "int", True, "channel"), CPU),
    "int8_tensor": (QuantSpec(8, "int", True, "tensor"), CPU),
    "int8_asym_g64": (QuantSpec(8, "int", False, "group", 64), CPU),
    "int2_asym_g64": (QuantSpec(2, "int", False, "group", 64), CPU),
    "int2_sym_g32": (QuantSpec(2, "int", True, "group", 32), CPU),
    "int3_asym_g64": (QuantSpec(3, "int", False, "group", 64), CPU),
    "int3_sym_g32": (QuantSpec(3, "int", True, "group", 32), CPU),
    "int3_sym_channel": (QuantSpec(3, "int", True, "channel"), CPU),
    "int5_sym_g64": (QuantSpec(5, "int", True, "group", 64), CPU),
    "int6_asym_g128": (QuantSpec(6, "int", False, "group", 128), CPU),
    "int7_sym_g32": (QuantSpec(7, "int", True, "group", 32), "torch"),
    "nf4_g64": (QuantSpec(4, "nf4", True, "group", 64), CPU),
    "fp4_g32": (QuantSpec(4, "fp4", True, "group", 32), CPU),
    "fp8_e4m3": (QuantSpec(8, "fp8_e4m3", True, "channel"), "torch"),
    "fp8_e5m2": (QuantSpec(8, "fp8_e5m2", True, "channel"), "torch"),
    "q4_k_scaled_zero": (QuantSpec(4, "int", False, "group", 32, scaled_zero=True), CPU),
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
        out[key] = (qw, b, QuantLinear.from_quantized(qw, b))
    return out


@pytest.mark.parametrize("key", list(SPECS))
def test_kernel_and_forward_match_dequantized_reference(built, key):
    qw, b, m = built[key]
    assert m.kernel == SPECS[key][1]
    ref_w = qw.dequantize()
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 3, 7, 100):  # GEMV for few rows (tiles of 1..4), dequant + bf16 GEMM for many
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
    m2 = QuantLinear.from_quantized(back, b)
    assert m2.kernel == m.kernel
    for name, buf in m.named_buffers():
        assert torch.equal(buf, dict(m2.named_buffers())[name]), name
    x = torch.randn(3, K)
    assert torch.equal(m(x), m2(x))


def test_w4_g64_sym_holds_one_copy_of_its_parameters(built):
    """4-bit codes + float16 scales, nothing else: 4.25 bits per weight in memory."""
    _, _, m = built["int4_sym_g64"]
    assert m.bits_per_weight() == pytest.approx(4.25)
    assert m.zero is None and m.perm is None and m.g_idx is None


@pytest.mark.skipif(not HAS_CPU, reason="lowbit's CPU kernels are not built or this CPU lacks AVX-512 BF16")
@pytest.mark.parametrize("key", [k for k, (_, kern) in SPECS.items() if kern == "cpu"])
def test_compiled_kernels_agree_with_pure_torch(built, key):
    """Same record, both kernels: dense weights identical after bf16 rounding, outputs within bf16
    rounding of the activations (the GEMV keeps the weight exact, the torch path rounds it to bf16)."""
    qw, b, m = built[key]
    t = QuantLinear.from_quantized(qw, b, kernel="torch")
    assert t.kernel == "torch"
    assert torch.equal(m.dense_weight(torch.bfloat16), t.dense_weight(torch.bfloat16))
    gen = torch.Generator().manual_seed(7)
    exact = qw.dequantize()
    for rows in (1, 2, 3, 4, 5, 8, 9, 64):
        x = torch.randn(rows, K, generator=gen)
        ref = x.bfloat16().float() @ exact.T + b  # bf16 activations, exact weights, fp32 sums
        y, yt = m(x), t(x)
        scale = ref.abs().max()
        if rows <= 8:  # the GEMV: exact weights; fp32 sums (of 128 + code, the 128 taken out per group)
            tol = 1e-4 if qw.spec.bits < 8 and not qw.spec.is_codebook else 5e-3
            assert (y - ref).abs().max() <= tol * scale, (key, rows)
        assert (y - yt).abs().max() <= 1.5e-2 * scale, (key, rows)


def test_act_order_is_stored_permuted_and_matches():
    w = _weight(3)
    spec = QuantSpec(4, "int", True, "group", 64)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(4))
    g_idx = (torch.arange(K) // 64)[perm].to(torch.int32)  # column -> group, not contiguous
    from lowbit.core import quantize_codes
    scale = quantize(w, spec).scale
    qw = QuantizedWeight(quantize_codes(w, scale, None, spec, g_idx), scale, None, spec, g_idx)
    m = QuantLinear.from_quantized(qw)
    assert m.kernel == CPU and m.g_idx is None and m.perm is not None
    assert torch.equal(m.dense_weight(), qw.dequantize().bfloat16())  # un-permuted, bf16 of the exact weight
    for rows in (1, 50):
        x = torch.randn(rows, K)
        assert _rel(m(x), x @ qw.dequantize().T) < 1e-2
    # an irregular g_idx (groups of unequal size) keeps g_idx and runs the pure-torch path
    odd = g_idx.clone()
    odd[odd == 1] = 0
    qw2 = QuantizedWeight(quantize_codes(w, scale, None, spec, odd), scale, None, spec, odd)
    m2 = QuantLinear.from_quantized(qw2)
    assert m2.kernel == "torch" and torch.equal(m2.g_idx, odd)
    x = torch.randn(2, K)
    assert _rel(m2(x), x @ qw2.dequantize().T) < 1e-2


def test_shapes_the_kernels_do_not_cover_fall_back_to_torch():
    spec = QuantSpec(4, "int", True, "group", 16)
    for n, k in [(48, 64), (100, 96)]:
        qw = quantize(_weight(5, n, k), spec)
        m = QuantLinear.from_quantized(qw)
        assert m.kernel == "torch"
        x = torch.randn(2, k)
        assert _rel(m(x), x @ qw.dequantize().T) < 1e-2
    with pytest.raises(LowbitError, match="do not run"):
        QuantLinear.from_quantized(quantize(_weight(5, 48, 64), spec), kernel="cpu")


def test_lm_head_shape():
    n, k = 49152, 576
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.02
    qw = quantize(w, QuantSpec(4, "int", True, "group", 64))
    m = QuantLinear.from_quantized(qw)
    assert m.kernel == CPU
    assert m.bits_per_weight() == pytest.approx(4.25)
    wd = qw.dequantize()
    for rows in (1, 12):  # GEMV, and dequant + GEMM
        x = torch.randn(1, rows, k)
        assert _rel(m(x), x @ wd.T) < 1e-2


def test_replace_linear():
    model = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(N, 64)))
    lin = model[1][1]
    qw = quantize(lin.weight.detach(), QuantSpec(8, "int", True, "channel"))
    q = QuantLinear.from_quantized(qw, lin.bias.detach())
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


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_kernel_layouts_round_trip(bits):
    from lowbit.nn import cpu_layout

    u = torch.randint(0, 2**bits, (5, 192), generator=torch.Generator().manual_seed(bits))
    packed = cpu_layout.pack(u, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 192 * bits // 8)
    assert torch.equal(cpu_layout.unpack(packed, bits, 192).to(torch.int64), u)
