"""Accumulation is explicit: the stated dtype and order, never numpy's or torch's choice."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coreml_lab.emulator import numerics

F16, F32 = torch.float16, torch.float32


def test_numpy_fp16_reductions_disagree_which_is_why_we_are_explicit():
    ones = np.ones(10_000, np.float16)
    assert ones.sum() == 10_000 and np.cumsum(ones)[-1] == 2048


def test_fp32_accumulation_of_fp16_values_is_exact():
    ones = torch.ones(10_000, dtype=F16)
    assert numerics.reduce_sum(ones, accumulate=F32).item() == 10_000


def test_pairwise_fp16_sum_rounds_every_partial_sum():
    # 1 + 2048 ones: sequentially stuck at 2048; pairwise the small terms first combine
    x = torch.cat([torch.tensor([2048.0]), torch.ones(2047)]).to(F16)
    got = numerics.pairwise_sum_fp16(x).item()
    assert got == 4096.0 or got == 4094.0  # representable neighbours; exact answer 4095 is not FP16
    # partial sums overflow to inf although each element is small
    big = torch.full((8,), 20000.0, dtype=F16)
    assert torch.isinf(numerics.reduce_sum(big, accumulate=F16))
    assert numerics.reduce_sum(big, accumulate=F32).item() == 160000.0


def test_sequential_fp16_cumsum_stagnates_at_2048():
    ones = torch.ones(3000, dtype=F16)
    assert numerics.cumsum(ones, 0, F16)[-1].item() == 2048.0
    assert numerics.cumsum(ones, 0, F32)[-1].item() == 3000.0


def test_fp16_matmul_accumulation_differs_from_fp32_but_stays_close():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 256, generator=g).to(F16)
    b = torch.randn(256, 8, generator=g).to(F16)
    exact = a.double() @ b.double()
    acc16 = numerics.matmul(a, b, F16).double()
    acc32 = numerics.matmul(a, b, F32).double()
    assert not torch.equal(acc16, acc32)
    assert (acc16 - exact).abs().max() > (acc32 - exact).abs().max()
    assert torch.allclose(acc16, exact, atol=0.5)


def test_fp16_conv_accumulation_matches_fp32_closely():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 9, 9, generator=g).to(F16)
    w = torch.randn(6, 2, 3, 3, generator=g).to(F16)
    ref = numerics.conv_nd(x, w, None, (2, 1), (1, 0), (1, 2), 2, F32)
    got = numerics.conv_nd(x, w, None, (2, 1), (1, 0), (1, 2), 2, F16)
    assert got.dtype == F16 and got.shape == ref.shape
    assert torch.allclose(got.float(), ref, atol=0.05, rtol=0.02)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_pairwise_sum_over_any_axes_is_close_to_exact(shape, data):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape)))
    keep = data.draw(st.booleans())
    rng = np.random.default_rng(len(shape))
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float16))
    dims = axes or None
    got = numerics.reduce_sum(x, dims, keep, F16)
    want = torch.sum(x.double(), dim=axes or list(range(len(shape))), keepdim=keep)
    assert got.shape == want.shape and got.dtype == F16
    assert torch.allclose(got.double(), want, atol=0.02 * max(1, x.numel() ** 0.5), rtol=0.01)


def test_reduce_mean_divides_after_accumulating():
    x = torch.full((4, 1000), 3.0, dtype=F16)
    assert numerics.reduce_mean(x, [1], False, F32).tolist() == [3.0] * 4
    # FP16 accumulation covers 3-d convolution too
    g = torch.Generator().manual_seed(2)
    x3 = torch.randn(1, 4, 5, 6, 7, generator=g).to(F16)
    w3 = torch.randn(6, 2, 3, 2, 3, generator=g).to(F16)
    ref3 = numerics.conv_nd(x3, w3, None, (1, 2, 1), (1, 0, 1), (2, 1, 1), 2, F32)
    got3 = numerics.conv_nd(x3, w3, None, (1, 2, 1), (1, 0, 1), (2, 1, 1), 2, F16)
    assert got3.dtype == F16 and got3.shape == ref3.shape
    assert torch.allclose(got3.float(), ref3, atol=0.05, rtol=0.02)
