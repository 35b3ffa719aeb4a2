"""Observers against numpy / scipy references (hypothesis over shapes, scales and outliers)."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy as scipy_entropy

from lowbit.observers import (entropy_range, fake_quant, kl_threshold, minmax_range, moving_average_range, mse_range,
                              percentile_range, range_qparams)
from lowbit.observers.entropy import abs_histogram
from lowbit.observers.state import RangeState
from lowbit.spec import ActSpec

SYM = ActSpec(granularity="tensor", dynamic=False)
ASYM = ActSpec(granularity="tensor", dynamic=False, symmetric=False)


@st.composite
def samples(draw, min_rows=2, max_rows=200, max_cols=6):
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(1e-3, 1e3))
    shift = draw(st.floats(-2.0, 2.0))
    g = np.random.default_rng(seed)
    x = (g.standard_normal((rows, cols)) + shift) * scale
    if draw(st.booleans()):  # a few outliers
        x[g.integers(0, rows), g.integers(0, cols)] *= 50
    return x.astype(np.float32)


@given(samples(), st.booleans())
def test_minmax_matches_numpy(x, per_channel):
    lo, hi = minmax_range(torch.from_numpy(x), per_channel)
    axis = 0 if per_channel else None
    np.testing.assert_array_equal(lo.numpy(), x.min(axis=axis))
    np.testing.assert_array_equal(hi.numpy(), x.max(axis=axis))


@given(st.lists(samples(max_cols=1), min_size=1, max_size=5), st.floats(0.001, 0.5))
def test_moving_average_matches_recurrence(batches, c):
    state = None
    ref = None
    for b in batches:
        state = moving_average_range(state, torch.from_numpy(b.reshape(-1, 1)), c)
        bl, bh = float(b.min()), float(b.max())
        ref = (bl, bh) if ref is None else (ref[0] + c * (bl - ref[0]), ref[1] + c * (bh - ref[1]))
    np.testing.assert_allclose([float(state[0]), float(state[1])], ref, rtol=1e-5, atol=1e-6 * max(map(abs, ref)))


@given(samples(), st.sampled_from([90.0, 99.0, 99.9, 99.99, 100.0]), st.booleans(), st.booleans())
def test_percentile_matches_numpy(x, p, symmetric, per_channel):
    lo, hi = percentile_range(torch.from_numpy(x), p, symmetric, per_channel)
    axis = 0 if per_channel else None
    if symmetric:
        want_hi = np.percentile(np.abs(x).astype(np.float64), p, axis=axis)
        want_lo = -want_hi
    else:
        want_hi = np.percentile(x.astype(np.float64), p, axis=axis)
        want_lo = np.percentile(x.astype(np.float64), 100 - p, axis=axis)
    tol = 1e-5 * np.abs(x).max()
    np.testing.assert_allclose(hi.numpy(), want_hi, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(lo.numpy(), want_lo, rtol=1e-5, atol=tol)


def _np_fake_quant(x, lo, hi, spec):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        s = max(max(-lo, hi) / spec.qmax, 1e-12)
        z = 0.0
    else:
        s = max((hi - lo) / (spec.qmax - spec.qmin), 1e-12)
        z = np.clip(spec.qmin - np.round(lo / s), spec.qmin, spec.qmax)
    q = np.clip(np.round(x / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


@given(samples(max_cols=3), st.sampled_from([SYM, ASYM]), st.booleans())
@settings(max_examples=25)
def test_mse_is_the_brute_force_minimum(x, spec, per_channel):
    grid = 40
    lo, hi = mse_range(torch.from_numpy(x), spec, per_channel, grid=grid)
    cols = [x[:, c] for c in range(x.shape[1])] if per_channel else [x.reshape(-1)]
    got_lo = np.atleast_1d(lo.numpy())
    got_hi = np.atleast_1d(hi.numpy())
    for i, col in enumerate(cols):
        errs = [np.mean((_np_fake_quant(col, col.min() * f, col.max() * f, spec) - col) ** 2)
                for f in np.linspace(0.2, 1.0, grid, dtype=np.float32)]
        got = np.mean((_np_fake_quant(col, got_lo[i], got_hi[i], spec) - col) ** 2)
        assert got <= min(errs) * (1 + 1e-4) + 1e-12
        assert got <= errs[-1] * (1 + 1e-4) + 1e-12  # never worse than plain min-max


def _reference_entropy_amax(bins, edges, num_bits=8, start=128, stride=1):
    """NVIDIA pytorch-quantization's _compute_amax_entropy, verbatim in its loops (the TensorRT rule)."""
    bins = bins.astype(np.float64)
    total = np.sum(bins)
    divergences, nbins = [], 1 << (num_bits - 1)
    for i in range(start, len(bins) + 1, stride):
        new_counts = np.zeros(nbins)
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        for idx, d in enumerate(digitized):
            if d != -1:
                new_counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                new_counts[key] = new_counts[key] / val
        new_density = np.zeros(i)
        for idx, d in enumerate(digitized):
            if d != -1:
                new_density[idx] = new_counts[d]
        ref = np.array(bins[:i])
        ref[-1] += np.sum(bins[i:])
        assert round(np.sum(ref)) == total
        divergences.append(scipy_entropy(ref / ref.sum(), new_density / new_density.sum()))
    divergences = np.array(divergences)
    last = len(divergences) - 1 - np.argmin(divergences[::-1])
    return edges[last * stride + start]


@given(samples(min_rows=500, max_rows=3000, max_cols=1), st.sampled_from([256, 512]))
@settings(max_examples=12)
def test_entropy_threshold_matches_tensorrt_reference(x, bins):
    hist, edges = abs_histogram(torch.from_numpy(x), bins)
    got = kl_threshold(hist, edges, 8)
    want = _reference_entropy_amax(hist, edges, 8)
    assert got == pytest.approx(float(want), rel=1e-12)


def test_entropy_clips_a_heavy_tail_and_keeps_a_uniform_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, 1, generator=g)
    x[:20] = 60.0  # a handful of outliers: min-max would spend the grid on them
    lo, hi = entropy_range(x, stride=4)
    assert 20.0 > float(hi) > 3.5
    assert float(lo) == -float(hi)
    u = torch.rand(100_000, 1, generator=g) * 2 - 1
    _, hu = entropy_range(u, stride=4)
    assert float(hu) > 0.9


@given(samples(), st.sampled_from([SYM, ASYM]))
def test_range_qparams_round_trip_within_half_a_step(x, spec):
    t = torch.from_numpy(x)
    lo, hi = minmax_range(t)
    scale, zero = range_qparams(lo, hi, spec)
    err = (fake_quant(t, scale, zero, spec) - t).abs().max()
    assert float(err) <= float(scale) * 0.5 * (1 + 1e-4)


def test_state_accumulates_batches_like_one_batch():
    torch.manual_seed(0)
    xs = [torch.randn(300, 8) * (i + 1) for i in range(3)]
    for obs in ("minmax", "percentile", "mse", "entropy"):
        for gran in ("tensor", "channel"):
            if obs == "entropy" and gran == "channel":
                continue
            spec = ActSpec(granularity=gran, dynamic=False, observer=obs)
            st_ = RangeState(spec)
            for x in xs:
                st_.update(x)
            one = RangeState(spec)
            one.update(torch.cat(xs))
            torch.testing.assert_close(st_.range(), one.range())


def test_state_refuses_nan_and_wrong_width():
    from lowbit.errors import LowbitError

    s = RangeState(ActSpec(granularity="tensor", dynamic=False), name="model.fc1")
    s.update(torch.randn(4, 8))
    with pytest.raises(LowbitError, match="model.fc1.*features"):
        s.update(torch.randn(4, 9))
    with pytest.raises(LowbitError, match="model.fc1.*NaN"):
        s.update(torch.full((2, 8), float("nan")))
