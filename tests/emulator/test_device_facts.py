"""Every Neural Engine fact the profiles encode, shown by the smallest ML Program that reaches it.

Each test builds its program with coremltools' MIL builder (or converts a one-line torch
function where the converter's own lowering is the point), converts it at FP16, runs it through
``EmulatedModel`` under ``CPU_AND_NE`` (the default A15-and-later generation) or
``ne_profile("M1")``, and asserts the published value. Sources (see device_facts.SOURCES):
AG = ane-guide numerics chapter, AF = ANEForge, HN = hollance/neural-engine, CT#n =
apple/coremltools issue n. The list of facts and what each test covers is device_facts.FACTS.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from opcheck import Fn, convert_mil, convert_torch, feeds, mil_outputs, op_types

from coreml_lab.emulator import EmulatedModel, ne_profile
from coreml_lab.emulator.device_facts import ACTIVATION_ERROR, FACTS
from coreml_lab.emulator.profiles import gpu_fp16_accumulation, ne_fp16_accumulation

NE = "CPU_AND_NE"
M1 = ne_profile("M1")


def _f32(*values, shape=None):
    a = np.array(values, dtype=np.float32)
    return a.reshape(shape) if shape is not None else a.reshape(1, -1)


def run16(build, inputs, cu=NE, target="iOS17"):
    """``build(x0, x1, ...)`` converted at FP16 (FP32 inputs cast to FP16 in the program), run under ``cu``."""
    ml = convert_mil(build, inputs, target, "fp16")
    (out,) = mil_outputs(ml, inputs, cu)
    return np.asarray(out, dtype=np.float64)


# ----------------------------------------------------------------------------- datapath and accumulation


def test_ne_stores_fp16_between_ops():
    """AG "fp16 datapath": inputs, weights and outputs are FP16; an FP32-typed op is barred from the NE
    (coremltools Typed Execution) and keeps FP32 on the CPU."""
    x, y = _f32(1.0), _f32(1e-4)
    assert run16(lambda a, b: mb.add(x=a, y=b), [x, y]) == 1.0                    # 1.0001 is not FP16
    ml32 = convert_mil(lambda a, b: mb.add(x=a, y=b), [x, y], precision="fp32")
    (got,) = mil_outputs(ml32, [x, y], NE)
    assert got == np.float32(1.0001)


def test_wide_accumulation_sums_16000_ones():
    """AG "Wide accumulator": 16,000 ones sum to exactly 16,000 (a naive FP16 running sum stalls at 2,048),
    through a reduction and through a matmul against ones; issue 13: avg_pool over 4,096 values of
    1,000 is 1,000 on the device (the old all-FP16 profile, ne_fp16_accumulation(), overflowed)."""
    ones = np.ones((1, 16000), np.float32)
    assert run16(lambda v: mb.reduce_sum(x=v, axes=[1]), [ones]) == 16000.0
    w = np.ones((1, 16000), np.float32)
    assert run16(lambda v: mb.linear(x=v, weight=w), [ones]) == 16000.0
    x = np.full((1, 1, 64, 64), 1000.0, np.float32)

    def pool(v):
        return mb.avg_pool(x=v, kernel_sizes=[64, 64], strides=[1, 1], pad_type="valid")

    assert run16(pool, [x]).item() == 1000.0
    assert np.isinf(run16(pool, [x], ne_fp16_accumulation()).item())


@pytest.mark.parametrize("a", [1024.0, 3000.0, 4090.0])
def test_wide_accumulation_near_exact_where_tiles_do_not_matter(a):
    """AG cancellation sweep: [a, -a, 1] x 16 keeps all 16 ones up to a = 4,090 (an FP16 running sum
    keeps none). [4096] + 1024 x [1] is 5,116 on the M1 (exact 5,120, naive FP16 4,096): the profile
    accumulates exactly and returns 5,120 - the 4-lane tile rounding is a documented omission."""
    v = np.array([a, -a, 1.0] * 16, np.float32).reshape(1, -1)
    w = np.ones_like(v)
    assert run16(lambda t: mb.linear(x=t, weight=w), [v]) == 16.0
    v = np.array([4096.0] + [1.0] * 1024, np.float32).reshape(1, -1)
    w = np.ones_like(v)
    got = run16(lambda t: mb.linear(x=t, weight=w), [v]).item()
    assert 5116.0 <= got <= 5120.0 and got != 4096.0


def test_bias_is_added_in_fp16():
    """AG: bias may be stored FP32 but is added in the FP16 datapath after the accumulator output is
    rounded: 1,024 + 1,025 = 2,049 rounds to 2,048, + 1 = 2,049 rounds to 2,048 again. The GPU adds it
    in FP32 (2,050)."""
    x = _f32(1024.0, 1025.0)
    w, b = np.ones((1, 2), np.float32), np.ones(1, np.float32)
    build = lambda t: mb.linear(x=t, weight=w, bias=b)
    assert run16(build, [x]) == 2048.0
    assert run16(build, [x], "CPU_AND_GPU") == 2050.0


def test_compressed_weight_multiplies_as_its_fp16_expansion():
    """AG "Compressed weights": an int8 affine weight is expanded to FP16 before the multiply, so the
    result is that of the FP16 weight, bit for bit."""
    q = np.array([[3, -5, 7, 127]], np.int8)
    scale = np.float16(0.1)
    x = _f32(1.5, -2.25, 3.0, 0.5)
    w16 = (q.astype(np.float16) * scale).astype(np.float16)

    def compressed(t):
        w = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=np.int8(0), scale=scale, axis=0)
        return mb.cast(x=mb.linear(x=mb.cast(x=t, dtype="fp16"), weight=w), dtype="fp32")

    def expanded(t):
        return mb.cast(x=mb.linear(x=mb.cast(x=t, dtype="fp16"), weight=w16), dtype="fp32")

    got = run16(compressed, [x], target="iOS16")
    want = run16(expanded, [x], target="iOS16")
    assert got == want and got != 0


def test_gpu_and_cpu_keep_their_documented_behaviour():
    """HN: the GPU holds FP16 tensors but computes and accumulates in FP32 (FP16 sums only with
    allowLowPrecisionAccumulationOnGPU); Typed Execution: the CPU runs FP16-typed ops in FP32."""
    v = _f32(2048.0, 1.0, 1.0, 1.0)
    build = lambda t: mb.reduce_sum(x=t, axes=[1])
    ml = convert_mil(build, [v], "iOS15", "fp16")  # iOS15: FP32 outputs, CPU values reach the output unrounded
    got = {cu: float(mil_outputs(ml, [v], cu)[0]) for cu in ("CPU_ONLY", "CPU_AND_GPU")}
    assert got == {"CPU_ONLY": 2051.0, "CPU_AND_GPU": 2052.0}  # FP32 sum; the GPU stores it as FP16
    assert float(mil_outputs(ml, [v], gpu_fp16_accumulation())[0]) == 2050.0  # pairwise FP16 partial sums


# ----------------------------------------------------------------------------- overflow ceilings


def test_mac_output_ceiling_2_15():
    """AG "Saturation hazard" (confirmed by AF on M2 Pro and M5): the multiply-accumulate output port
    saturates at 2^15 - a linear, matmul or convolution of two or more taps returns 32,752 finite and
    32,768 as +inf, for K = 1, K = 2 and a two-channel convolution. The GPU returns 32,768."""
    w1, w2 = np.ones((1, 1), np.float32), np.ones((1, 2), np.float32)
    assert run16(lambda t: mb.linear(x=t, weight=w1), [_f32(32752.0)]) == 32752.0
    assert run16(lambda t: mb.linear(x=t, weight=w1), [_f32(32768.0)]) == math.inf
    assert run16(lambda t: mb.linear(x=t, weight=w2), [_f32(16376.0, 16376.0)]) == 32752.0
    assert run16(lambda t: mb.linear(x=t, weight=w2), [_f32(16384.0, 16384.0)]) == math.inf
    assert run16(lambda t: mb.linear(x=t, weight=w2), [_f32(16384.0, 16384.0)], "CPU_AND_GPU") == 32768.0
    assert run16(lambda t: mb.linear(x=t, weight=w2), [_f32(-16384.0, -16384.0)]) == -math.inf
    a, b = _f32(128.0, 128.0), np.full((2, 1), 128.0, np.float32)
    assert run16(lambda s, t: mb.matmul(x=s, y=t), [a, b]) == math.inf               # 2 x 16,384
    wc = np.ones((1, 2, 1, 1), np.float32)
    x = np.full((1, 2, 1, 1), 16384.0, np.float32)
    assert run16(lambda t: mb.conv(x=t, weight=wc), [x]).item() == math.inf           # two taps
    x = np.full((1, 2, 1, 1), 16376.0, np.float32)
    assert run16(lambda t: mb.conv(x=t, weight=wc), [x]).item() == 32752.0


def test_elementwise_reduction_and_single_tap_conv_keep_65504():
    """AG: elementwise ops and dedicated reductions keep the full FP16 range (65,504); an elementwise
    multiply overflows only at the FP16 limit; a 1x1 single-input-channel convolution passes 60,000."""
    assert run16(lambda s, t: mb.mul(x=s, y=t), [_f32(32768.0), _f32(1.999)]) == 65504.0
    assert run16(lambda s, t: mb.mul(x=s, y=t), [_f32(32768.0), _f32(2.0)]) == math.inf
    assert run16(lambda t: mb.reduce_sum(x=t, axes=[1]), [_f32(32768.0, 32736.0)]) == 65504.0
    w = np.ones((1, 1, 1, 1), np.float32)
    x = np.full((1, 1, 2, 2), 60000.0, np.float32)
    np.testing.assert_array_equal(run16(lambda t: mb.conv(x=t, weight=w), [x]), 60000.0)


def test_exp_and_square_overflow_where_fp16_does():
    """AG: exp first returns +inf at input 11.094 (= ln 65504); square at 256."""
    got = run16(lambda t: mb.exp(x=t), [_f32(11.0859375, 11.09375)])
    assert np.isfinite(got[0, 0]) and got[0, 1] == math.inf
    got = run16(lambda t: mb.square(x=t), [_f32(255.875, 256.0)])
    assert got[0, 0] == 65472.0 and got[0, 1] == math.inf


def test_width_slice_gain_on_m1_only():
    """AG: a width-axis slice with a non-zero begin offset applies a gain of 16 on M1 and A14 - 4,094
    passes, 4,096 becomes +inf; a zero begin offset or another axis is unaffected; fixed on A15 and
    later (the default profile)."""
    x = np.array([[4096.0, 4094.0, 4096.0], [4096.0, 4094.0, 4096.0]], np.float32)

    def width(t):
        return mb.slice_by_index(x=t, begin=[0, 1], end=[2, 3])

    np.testing.assert_array_equal(run16(width, [x], M1), [[4094.0, math.inf]] * 2)
    np.testing.assert_array_equal(run16(width, [x], NE), [[4094.0, 4096.0]] * 2)
    np.testing.assert_array_equal(run16(lambda t: mb.slice_by_index(x=t, begin=[0, 0], end=[2, 2]), [x], M1),
                                  [[4096.0, 4094.0]] * 2)
    np.testing.assert_array_equal(run16(lambda t: mb.slice_by_index(x=t, begin=[1, 0], end=[2, 3]), [x], M1),
                                  [[4096.0, 4094.0, 4096.0]])
    np.testing.assert_array_equal(run16(lambda t: mb.slice_by_size(x=t, begin=[0, 2], size=[1, 1]), [x], M1),
                                  [[math.inf]])


def test_softmax_is_max_shifted():
    """AG: softmax subtracts the maximum in hardware - softmax([1000, 1, 2, 3]) = [1, 0, 0, 0]; four equal
    values give four quarters."""
    np.testing.assert_array_equal(run16(lambda t: mb.softmax(x=t, axis=-1), [_f32(1000.0, 1.0, 2.0, 3.0)]),
                                  [[1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(run16(lambda t: mb.softmax(x=t, axis=-1), [_f32(5.0, 5.0, 5.0, 5.0)]),
                                  [[0.25] * 4])


# ----------------------------------------------------------------------------- special values


@pytest.mark.parametrize("op, want", [("relu", math.inf), ("sigmoid", 1.0), ("tanh", 1.0), ("erf", 1.0),
                                      ("exp", math.inf)])
def test_nan_becomes_inf_at_the_ne_input(op, want):
    """AG "Edge behavior": NaN is coerced to +inf at the input boundary - relu(NaN) = +inf,
    sigmoid / tanh / erf(NaN) = 1.0, exp(NaN) = +inf; CPU_ONLY keeps NaN."""
    x = _f32(math.nan, -1.0)
    fn = getattr(mb, op)
    got = run16(lambda t: fn(x=t), [x])
    assert got[0, 0] == want
    assert np.isnan(run16(lambda t: fn(x=t), [x], "CPU_ONLY")[0, 0])


def test_softmax_lane_holding_nan_takes_all_the_mass():
    """AG: a softmax of a lane holding a NaN puts all the mass on that lane; the engine never outputs
    NaN. The GPU returns NaN everywhere."""
    x = _f32(math.nan, 1.0, 2.0, 3.0)
    np.testing.assert_array_equal(run16(lambda t: mb.softmax(x=t, axis=-1), [x]), [[1.0, 0.0, 0.0, 0.0]])
    assert np.isnan(run16(lambda t: mb.softmax(x=t, axis=-1), [x], "CPU_AND_GPU")).all()


@pytest.mark.parametrize("build, inputs", [
    (lambda a, b: mb.sub(x=a, y=b), [_f32(math.inf), _f32(math.inf)]),
    (lambda a, b: mb.mul(x=a, y=b), [_f32(0.0), _f32(math.inf)]),
    (lambda a: mb.sqrt(x=a), [_f32(-1.0)]),
    (lambda a: mb.rsqrt(x=a), [_f32(-1.0)]),
    (lambda a: mb.log(x=a), [_f32(-1.0)]),
], ids=["inf-inf", "0*inf", "sqrt(-1)", "rsqrt(-1)", "log(-1)"])
def test_indeterminate_forms_return_plus_zero(build, inputs):
    """AG: the indeterminate forms inf - inf, 0 x inf, sqrt(-1), rsqrt(-1), log(-1) return +0 on the
    Neural Engine (IEEE and the GPU give NaN)."""
    got = run16(build, inputs)
    assert got.item() == 0.0 and not np.signbit(got.item())
    assert np.isnan(run16(build, inputs, "CPU_AND_GPU").item())


def test_log_of_zero_is_the_sentinel():
    """AG: log(+0) returns the finite sentinel -45,440, not -inf (the GPU gives -inf)."""
    assert run16(lambda t: mb.log(x=t), [_f32(0.0)]) == -45440.0
    # the GPU computes log(x + epsilon) in FP32 (epsilon 1e-45 is an FP32 denormal): no sentinel there
    assert run16(lambda t: mb.log(x=t), [_f32(0.0)], "CPU_AND_GPU") != -45440.0


def test_softplus_and_softsign_of_inf_are_zero():
    """AG: softplus(+inf) and softsign(+inf) return +0 (where +inf and 1 are right)."""
    x = _f32(math.inf, 2.0)
    sp = run16(lambda t: mb.softplus(x=t), [x])
    ss = run16(lambda t: mb.softsign(x=t), [x])
    assert sp[0, 0] == 0.0 and ss[0, 0] == 0.0
    assert abs(sp[0, 1] - math.log1p(math.exp(2.0))) < 4e-3 and abs(ss[0, 1] - 2 / 3) < 1e-3


def test_denormals_flushed_in_the_mac_on_m1_only():
    """AG: denormals survive elementwise ops (x + 0) but a pair of denormals summed inside a matmul
    returns +0 on the M1; the M5 accumulator keeps them."""
    d = 2.0 ** -20
    x = _f32(d, 2 * d)
    w = np.ones((1, 2), np.float32)
    assert run16(lambda t: mb.linear(x=t, weight=w), [x], M1) == 0.0
    assert run16(lambda t: mb.linear(x=t, weight=w), [x], NE) == 3 * d
    np.testing.assert_array_equal(run16(lambda t: mb.add(x=t, y=np.float32(0.0)), [x], M1), [[d, 2 * d]])


def test_reciprocal_of_negative_zero():
    """AG: the sign of zero is dropped before reciprocal / rsqrt - 1/(-0) = +inf and rsqrt(-0) = +inf on the
    Neural Engine, where IEEE (the GPU) gives -inf for a division by -0. (MIL's inverse and rsqrt add
    their epsilon first, and -0 + 0 = +0 in IEEE too.)"""
    z = _f32(-0.0)
    for build in (lambda t: mb.inverse(x=t, epsilon=0.0), lambda t: mb.rsqrt(x=t, epsilon=0.0)):
        assert run16(build, [z]) == math.inf
    divide = lambda t: mb.real_div(x=np.float32(1.0), y=t)
    assert run16(divide, [z]) == math.inf
    assert run16(divide, [z], "CPU_AND_GPU") == -math.inf


def test_output_rounding_is_half_to_even():
    """AG: output rounding is round half to even on M1 - 2,049 at spacing 2 becomes 2,048 (2,051 -> 2,052)."""
    got = run16(lambda a, b: mb.add(x=a, y=b), [_f32(2048.0, 2050.0), _f32(1.0, 1.0)], M1)
    np.testing.assert_array_equal(got, [[2048.0, 2052.0]])


def test_results_are_deterministic_and_batch_independent():
    """AG "Determinism": bit-identical across reruns and independent of batch size and position."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g).numpy()
    rows = torch.randn(16, 16, generator=g).numpy()
    ml = convert_mil(lambda t: mb.linear(x=t, weight=w), [rows], precision="fp16")
    batch = mil_outputs(ml, [rows], NE)[0]
    again = mil_outputs(ml, [rows], NE)[0]
    assert batch.tobytes() == again.tobytes()
    ml1 = convert_mil(lambda t: mb.linear(x=t, weight=w), [rows[:1]], precision="fp16")
    same_row = np.repeat(rows[3:4], 16, axis=0)
    alone = mil_outputs(ml1, [rows[3:4]], NE)[0]
    assert alone.tobytes() == batch[3:4].tobytes()
    placed = mil_outputs(ml, [same_row], NE)[0]
    assert (placed == alone).all()


# ----------------------------------------------------------------------------- activation tables


@pytest.mark.parametrize("op", sorted(ACTIVATION_ERROR))
def test_activations_within_published_table_error(op):
    """AG "Activation functions": worst absolute error on device sigmoid 0.0034, tanh 0.0017, gelu 0.0059,
    about half an FP16 ulp of the exact function. The profile models a table as the exact function
    rounded to FP16 (the knots are not published), so its error stays within those bounds."""
    x = np.linspace(-8.0, 8.0, 2001, dtype=np.float32).reshape(1, -1)
    x16 = x.astype(np.float16).astype(np.float64)
    exact = {"sigmoid": 1 / (1 + np.exp(-x16)), "tanh": np.tanh(x16),
             "gelu": 0.5 * x16 * (1 + np.vectorize(math.erf)(x16 / math.sqrt(2)))}[op]
    got = run16(lambda t: getattr(mb, op)(x=t), [x])
    err = np.abs(got - exact).max()
    assert 0 < err <= ACTIVATION_ERROR[op], err


# ----------------------------------------------------------------------------- field reports


def test_softplus_field_cliff_near_10_4():
    """apple/coremltools#2687: softplus drops to 0 above about 10.4 on the Neural Engine; CPU and GPU
    are right. Modelled as exp(x) leaving the multiply-accumulate port (2^15 ceiling, AG):
    ln(32768) = 10.397, the first FP16 input past it is 10.398."""
    x = torch.linspace(10.0, 10.8, 103).reshape(1, -1)
    ml = convert_torch(Fn(F.softplus), [x], "fp16")
    assert "softplus" in op_types(ml)
    xv = x.numpy().astype(np.float16).astype(np.float64).reshape(-1)
    ne = next(iter(EmulatedModel(ml, NE).predict(feeds([x])).values())).reshape(-1)
    gpu = next(iter(EmulatedModel(ml, "CPU_AND_GPU").predict(feeds([x])).values())).reshape(-1)
    cliff = xv[np.nonzero(ne == 0.0)[0][0]]
    assert 10.39 < cliff < 10.41, cliff
    assert (ne[xv >= cliff] == 0).all() and (ne[xv < cliff] >= 9.99).all()
    np.testing.assert_allclose(gpu, np.log1p(np.exp(xv)), rtol=2e-3)


def test_channel_reduce_log_sum_exp_collapses_near_7_63():
    """apple/coremltools#2690 / #2726: channel reduce_log_sum_exp has no max shift on the Neural Engine
    and collapses where 32 x exp(x) > 65,504, near x = 7.63; below that it is right."""
    model = Fn(lambda t: torch.logsumexp(t, dim=1))
    for value, collapsed in ((7.6, False), (7.65, True)):
        x = torch.full((1, 32, 1, 1), value)
        ml = convert_torch(model, [x], "fp16")
        assert "reduce_log_sum_exp" in op_types(ml)
        got = float(next(iter(EmulatedModel(ml, NE).predict(feeds([x])).values())).item())
        if collapsed:
            assert got == 0.0
        else:
            assert abs(got - (value + math.log(32))) < 0.02


def test_log_softmax_tail_collapses():
    """apple/coremltools#2728: log_softmax returns -inf in FP16 on the Neural Engine. The converter writes
    it as softmax + log; the tail probability underflows FP16 and log(0) gives the NE sentinel -45,440
    (AG); without the log_zero_sentinel rule the profile gives the -inf of the report. CPU_ONLY is right."""
    x = torch.tensor([[0.0, -30.0]])
    ml = convert_torch(Fn(lambda t: F.log_softmax(t, dim=-1)), [x], "fp16")
    assert {"softmax", "log"} <= op_types(ml)
    f = feeds([x])
    assert next(iter(EmulatedModel(ml, NE).predict(f).values()))[0, 1] == -45440.0
    ne = EmulatedModel(ml, NE).profile.devices[0]
    report_like = EmulatedModel(ml, "CPU_AND_NE").profile.with_device(
        "NE", hazards=ne.hazards - {"log_zero_sentinel"})
    assert next(iter(EmulatedModel(ml, report_like).predict(f).values()))[0, 1] == -math.inf
    assert abs(next(iter(EmulatedModel(ml, "CPU_ONLY").predict(f).values()))[0, 1] + 30.0) < 1e-3


def test_mish_collapses_past_the_softplus_cliff():
    """apple/coremltools#2359: Mish has large FP16 error on the Neural Engine. The converter writes
    mish as x * tanh(softplus(x)); past the softplus cliff the NE returns 0 where mish(x) ~ x."""
    x = torch.tensor([[2.0, 11.0]])
    ml = convert_torch(Fn(F.mish), [x], "fp16")
    assert "softplus" in op_types(ml)
    ne = next(iter(EmulatedModel(ml, NE).predict(feeds([x])).values()))
    cpu = next(iter(EmulatedModel(ml, "CPU_ONLY").predict(feeds([x])).values()))
    assert ne[0, 1] == 0.0 and abs(cpu[0, 1] - 11.0) < 1e-3
    assert abs(ne[0, 0] - cpu[0, 0]) < 1e-2


def test_minus_1e9_mask_gives_nan_on_gpu_and_no_nan_on_ne():
    """cactus-compute/cactus PR 734: an attention mask of -1e9 overflows FP16 (-inf) and a fully masked
    row produces NaN - on the GPU. The Neural Engine never outputs NaN (AG): -inf - (-inf) is +0 there."""
    scores = _f32(0.5, 1.0, 2.0)
    mask = _f32(-1e9, -1e9, -1e9)
    build = lambda s, m: mb.softmax(x=mb.add(x=s, y=m), axis=-1)
    assert np.isnan(run16(build, [scores, mask], "CPU_AND_GPU")).all()
    ne = run16(build, [scores, mask])
    assert np.isfinite(ne).all()


def test_every_encoded_fact_names_a_test_here_or_in_pitfalls():
    """device_facts.FACTS: each fact is reproduced by a named test, or left out with a reason."""
    here = set(globals())
    for fact in FACTS:
        assert fact.test or fact.left_out, fact.key
        if fact.test.startswith("tests/emulator/test_device_facts.py::"):
            assert fact.test.split("::")[1] in here, fact.test
