"""Recurrent kernels (lstm, gru, rnn) against torch and numpy references.

What torch models become (coremltools 9): ``nn.LSTM`` -> one MIL ``lstm`` per layer
(``direction="bidirectional"`` for bidirectional layers; FP32-only at iOS15, so an
FP16 conversion keeps it FP32 there); ``nn.RNN`` (tanh / relu, unidirectional) ->
``rnn`` per layer; ``nn.GRU`` -> a ``while_loop`` of elementwise ops (the MIL ``gru``
has different reset-gate semantics), so ``gru`` is tested through the MIL builder.
``direction="reverse"``, peepholes, clip and non-default activations are reachable
only through the builder too.
"""

from __future__ import annotations

from functools import partial

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn as nn
from coremltools.converters.mil import Builder as mb
from opcheck import FakeOpCall, check_mil_outputs, check_torch_op, emulate_mil, op_types

from coreml_lab.emulator import EmulatedModel
from coreml_lab.emulator.ops import recurrent as rec_ops

# FP16 tolerance of these tests: rtol 2e-2 (FP16_RTOL), atol 2e-2 * max|want|
check_mil = partial(check_mil_outputs, fp16_atol=2e-2)


# -- helpers -------------------------------------------------------------------------------

def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


_NP_ACT = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "scaled_tanh": np.tanh,
    "relu": lambda v: np.maximum(v, 0.0),
    "linear": lambda v: v,
    "hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0.0, 1.0),
}


def np_lstm(x, h, c, w_ih, w_hh, b, p, reverse, ra="sigmoid", ca="tanh", act="tanh", clip=None):
    """Numpy reference from the MIL docstring; returns (outputs in processing order, h, c)."""
    H = w_hh.shape[1]
    ra_, ca_, act_ = _NP_ACT[ra], _NP_ACT[ca], _NP_ACT[act]
    pi, pf, po = np.split(p, 3) if p is not None else (0.0, 0.0, 0.0)
    b = np.zeros(4 * H) if b is None else b
    outs = []
    for t in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        g = x[t] @ w_ih.T + h @ w_hh.T + b
        gi, gf, go, gz = np.split(g, 4, axis=-1)
        i = ra_(gi + c * pi)
        f = ra_(gf + c * pf)
        z = ca_(gz)
        c = f * c + i * z
        if clip is not None:
            c = np.clip(c, -clip, clip)
        o = ra_(go + c * po)
        h = o * act_(c)
        outs.append(h)
    return np.stack(outs), h, c


def np_gru(x, h, w_ih, w_hh, b, reverse, ra="sigmoid", act="tanh"):
    """MIL gru with the reset gate applied to h before the recurrent matmul."""
    H = w_hh.shape[1]
    W_r, W_o, W_z = np.split(w_ih, 3)
    R_r, R_o, R_z = np.split(w_hh, 3)
    b_r, b_o, b_z = np.split(np.zeros(3 * H) if b is None else b, 3)
    outs = []
    for t in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        xt = x[t]
        z = _NP_ACT[ra](xt @ W_z.T + h @ R_z.T + b_z)
        r = _NP_ACT[ra](xt @ W_r.T + h @ R_r.T + b_r)
        o = _NP_ACT[act](xt @ W_o.T + (r * h) @ R_o.T + b_o)
        h = (1 - z) * o + z * h
        outs.append(h)
    return np.stack(outs), h


def np_rnn(x, h, w_ih, w_hh, b, reverse, act="tanh"):
    outs = []
    b = 0.0 if b is None else b
    for t in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        h = _NP_ACT[act](x[t] @ w_ih.T + h @ w_hh.T + b)
        outs.append(h)
    return np.stack(outs), h


def _rand(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# -- torch models --------------------------------------------------------------------------

class RNNWrap(nn.Module):
    """Runs an nn.LSTM / nn.GRU / nn.RNN and returns all of its outputs as a flat tuple."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *state):
        if isinstance(self.rnn, nn.LSTM):
            out, (h, c) = self.rnn(x, tuple(state) if state else None)
            return out, h, c
        out, h = self.rnn(x, state[0] if state else None)
        return out, h


def _seeded(factory):
    torch.manual_seed(0)
    return factory()


LSTM_CASES = [
    # (num_layers, bidirectional, batch_first, with_state, target)
    (1, False, False, False, "iOS15"),
    (1, False, False, True, "iOS17"),
    (2, False, True, True, "iOS15"),
    (2, False, False, False, "iOS18"),
    (1, True, False, True, "iOS15"),
    (1, True, True, False, "iOS17"),
    (2, True, False, True, "iOS17"),
]


@pytest.mark.parametrize("layers, bidir, batch_first, with_state, target", LSTM_CASES)
def test_torch_lstm(layers, bidir, batch_first, with_state, target):
    m = _seeded(lambda: nn.LSTM(5, 6, num_layers=layers, bidirectional=bidir, batch_first=batch_first))
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5) if batch_first else torch.randn(4, 2, 5)
    inputs = [x]
    if with_state:
        d = 2 if bidir else 1
        inputs += [torch.randn(layers * d, 2, 6), torch.randn(layers * d, 2, 6)]
    ml = check_torch_op(RNNWrap(m), inputs, ["lstm"], target=target)
    lstm_ops = [op for op in ml._mil_program.functions["main"].operations if op.op_type == "lstm"]
    assert len(lstm_ops) == layers
    assert all(op.direction.val == ("bidirectional" if bidir else "forward") for op in lstm_ops)


@pytest.mark.parametrize("nonlinearity, layers, batch_first, with_state, target", [
    ("tanh", 1, False, False, "iOS15"),
    ("relu", 1, True, True, "iOS17"),
    ("tanh", 2, False, True, "iOS18"),
    ("relu", 2, True, False, "iOS15"),
])
def test_torch_rnn(nonlinearity, layers, batch_first, with_state, target):
    m = _seeded(lambda: nn.RNN(5, 6, num_layers=layers, nonlinearity=nonlinearity, batch_first=batch_first))
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5) if batch_first else torch.randn(4, 2, 5)
    inputs = [x] + ([torch.randn(layers, 2, 6)] if with_state else [])
    ml = check_torch_op(RNNWrap(m), inputs, ["rnn"], target=target)
    acts = {op.activation.val for op in ml._mil_program.functions["main"].operations if op.op_type == "rnn"}
    assert acts == {nonlinearity}


def test_torch_lstm_long_sequence_fp16_drift_is_bounded():
    """A 24-step LSTM in FP16: the emulated NE/GPU error stays inside FP16 tolerance (and is not 0)."""
    m = _seeded(lambda: nn.LSTM(8, 16))
    torch.manual_seed(2)
    x = torch.randn(24, 1, 8)
    check_torch_op(RNNWrap(m), [x], ["lstm"], target="iOS17", fp16_rtol=3e-2)


@pytest.mark.parametrize("target", ["iOS15", "iOS18"])
def test_torch_gru_is_lowered_to_a_loop_not_mil_gru(target):
    """nn.GRU never reaches the MIL ``gru`` op (its reset gate differs); the gru kernel is covered below."""
    m = _seeded(lambda: nn.GRU(3, 4))
    from opcheck import convert_torch
    ml = convert_torch(RNNWrap(m), [torch.randn(4, 2, 3)], "fp32", target)
    ops = op_types(ml)
    assert "gru" not in ops and "while_loop" in ops


# -- MIL builder: lstm ---------------------------------------------------------------------

@pytest.mark.parametrize("direction, output_sequence, peephole, clip, acts, target", [
    ("forward", True, True, None, ("sigmoid", "tanh", "tanh"), ct.target.iOS15),
    ("reverse", True, False, None, ("sigmoid", "tanh", "tanh"), ct.target.iOS17),
    ("reverse", False, True, 0.6, ("hard_sigmoid", "relu", "linear"), ct.target.iOS17),
    ("forward", False, False, 0.3, ("sigmoid", "scaled_tanh", "tanh"), ct.target.iOS15),
])
def test_mil_lstm(direction, output_sequence, peephole, clip, acts, target):
    rng = np.random.default_rng(3)
    s, b, I, H = 5, 3, 4, 6
    x, h0, c0 = _rand(rng, s, b, I, scale=1.0), _rand(rng, b, H), _rand(rng, b, H)
    w_ih, w_hh, bias = _rand(rng, 4 * H, I), _rand(rng, 4 * H, H), _rand(rng, 4 * H)
    p = _rand(rng, 3 * H) if peephole else None
    outs, h, c = np_lstm(x, h0, c0, w_ih, w_hh, bias, p, direction == "reverse", *acts, clip=clip)
    seq = outs if output_sequence else h[None]

    def build(x_, h_, c_):
        kw = dict(peephole=p) if peephole else {}
        if clip is not None:
            kw["clip"] = np.float32(clip)
        return mb.lstm(x=x_, initial_h=h_, initial_c=c_, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                       direction=direction, output_sequence=output_sequence, recurrent_activation=acts[0],
                       cell_activation=acts[1], activation=acts[2], **kw)

    check_mil(build, {"x": x, "h": h0, "c": c0}, [seq, h, c], target, "lstm",
              fp16=target >= ct.target.iOS17)
    if clip is not None:
        assert np.max(np.abs(c)) <= clip + 1e-6  # the reference really clipped


@pytest.mark.parametrize("output_sequence, peephole", [(True, True), (False, False)])
def test_mil_lstm_bidirectional(output_sequence, peephole):
    rng = np.random.default_rng(4)
    s, b, I, H = 4, 2, 3, 5
    x, h0, c0 = _rand(rng, s, b, I, scale=1.0), _rand(rng, b, 2 * H), _rand(rng, b, 2 * H)
    wf = [_rand(rng, 4 * H, I), _rand(rng, 4 * H, H), _rand(rng, 4 * H), _rand(rng, 3 * H)]
    wb = [_rand(rng, 4 * H, I), _rand(rng, 4 * H, H), _rand(rng, 4 * H), _rand(rng, 3 * H)]
    of, hf, cf = np_lstm(x, h0[:, :H], c0[:, :H], *wf[:3], wf[3] if peephole else None, False)
    ob, hb, cb = np_lstm(x, h0[:, H:], c0[:, H:], *wb[:3], wb[3] if peephole else None, True)
    h, c = np.concatenate([hf, hb], -1), np.concatenate([cf, cb], -1)
    seq = np.concatenate([of, ob[::-1]], -1) if output_sequence else h[None]

    def build(x_, h_, c_):
        kw = dict(peephole=wf[3], peephole_back=wb[3]) if peephole else {}
        return mb.lstm(x=x_, initial_h=h_, initial_c=c_, weight_ih=wf[0], weight_hh=wf[1], bias=wf[2],
                       weight_ih_back=wb[0], weight_hh_back=wb[1], bias_back=wb[2],
                       direction="bidirectional", output_sequence=output_sequence, **kw)

    check_mil(build, {"x": x, "h": h0, "c": c0}, [seq, h, c], ct.target.iOS17, "lstm")


# -- MIL builder: gru ----------------------------------------------------------------------

@pytest.mark.parametrize("direction, output_sequence, has_bias, acts, target", [
    ("forward", True, True, ("sigmoid", "tanh"), ct.target.iOS15),
    ("reverse", True, False, ("sigmoid", "tanh"), ct.target.iOS17),
    ("reverse", False, True, ("tanh", "sigmoid"), ct.target.iOS15),
    ("forward", False, True, ("hard_sigmoid", "relu"), ct.target.iOS18),
])
def test_mil_gru(direction, output_sequence, has_bias, acts, target):
    rng = np.random.default_rng(5)
    s, b, I, H = 5, 2, 3, 4
    x, h0 = _rand(rng, s, b, I, scale=1.0), _rand(rng, b, H)
    w_ih, w_hh, bias = _rand(rng, 3 * H, I), _rand(rng, 3 * H, H), _rand(rng, 3 * H)
    outs, h = np_gru(x, h0, w_ih, w_hh, bias if has_bias else None, direction == "reverse",
                     ra=acts[0], act=acts[1])

    def build(x_, h_):
        kw = dict(bias=bias) if has_bias else {}
        return mb.gru(x=x_, initial_h=h_, weight_ih=w_ih, weight_hh=w_hh, direction=direction,
                      output_sequence=output_sequence, recurrent_activation=acts[0], activation=acts[1], **kw)

    check_mil(build, {"x": x, "h": h0}, [outs if output_sequence else h[None], h], target, "gru",
              fp16=target >= ct.target.iOS17)


def test_mil_gru_reset_before_differs_from_torch_gru():
    """The iOS15 gru is not torch's GRU: the emulator must not silently compute torch semantics."""
    torch.manual_seed(6)
    g = nn.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        want_torch, _ = g(x)
    sd = {k: v.numpy() for k, v in g.state_dict().items()}
    rz_n = lambda w: np.concatenate([w[:4], w[8:], w[4:8]])  # torch [r, z, n] -> MIL [r, o, z]
    got = emulate_mil(lambda x_, h_: mb.gru(x=x_, initial_h=h_, weight_ih=rz_n(sd["weight_ih_l0"]),
                                            weight_hh=rz_n(sd["weight_hh_l0"]),
                                            bias=rz_n(sd["bias_ih_l0"] + sd["bias_hh_l0"]), output_sequence=True),
                      {"x": x.numpy(), "h": np.zeros((2, 4), np.float32)}, ct.target.iOS17)["CPU_ONLY"][0]
    ref, _ = np_gru(x.numpy(), np.zeros((2, 4)), rz_n(sd["weight_ih_l0"]), rz_n(sd["weight_hh_l0"]),
                    rz_n(sd["bias_ih_l0"] + sd["bias_hh_l0"]), False)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got - want_torch.numpy())) > 1e-3


@pytest.mark.parametrize("output_sequence", [True, False])
def test_mil_gru_ios18_reset_after_matches_torch(output_sequence):
    """iOS18 gru(reset_after=True, input_bias=b_ih, bias=b_hh) is torch's GRU."""
    torch.manual_seed(7)
    g = nn.GRU(3, 4)
    x, h0 = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    with torch.no_grad():
        out, hn = g(x, h0)
    sd = {k: v.numpy() for k, v in g.state_dict().items()}
    reorder = lambda w: np.concatenate([w[:4], w[8:], w[4:8]])

    def build(x_, h_):
        return mb.gru(x=x_, initial_h=h_, weight_ih=reorder(sd["weight_ih_l0"]),
                      weight_hh=reorder(sd["weight_hh_l0"]), input_bias=reorder(sd["bias_ih_l0"]),
                      bias=reorder(sd["bias_hh_l0"]), reset_after=True, output_sequence=output_sequence)

    want_seq = out.numpy() if output_sequence else hn.numpy()
    check_mil(build, {"x": x.numpy(), "h": h0[0].numpy()}, [want_seq, hn[0].numpy()], ct.target.iOS18, "gru")


def test_mil_gru_ios18_input_bias_without_reset_after():
    """reset_after=False: input_bias and bias both add outside the reset gate."""
    rng = np.random.default_rng(8)
    s, b, I, H = 4, 2, 3, 4
    x, h0 = _rand(rng, s, b, I, scale=1.0), _rand(rng, b, H)
    w_ih, w_hh, bias, ib = _rand(rng, 3 * H, I), _rand(rng, 3 * H, H), _rand(rng, 3 * H), _rand(rng, 3 * H)
    outs, h = np_gru(x, h0, w_ih, w_hh, bias + ib, False)
    check_mil(lambda x_, h_: mb.gru(x=x_, initial_h=h_, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                                    input_bias=ib, output_sequence=True),
              {"x": x, "h": h0}, [outs, h], ct.target.iOS18, "gru")


# -- MIL builder: rnn ----------------------------------------------------------------------

@pytest.mark.parametrize("direction, output_sequence, act, target", [
    ("reverse", True, "tanh", ct.target.iOS15),
    ("reverse", False, "sigmoid", ct.target.iOS17),
    ("forward", True, "hard_sigmoid", ct.target.iOS17),
    ("forward", False, "linear", ct.target.iOS15),
])
def test_mil_rnn(direction, output_sequence, act, target):
    rng = np.random.default_rng(9)
    s, b, I, H = 5, 2, 3, 4
    x, h0 = _rand(rng, s, b, I, scale=1.0), _rand(rng, b, H)
    w_ih, w_hh, bias = _rand(rng, H, I), _rand(rng, H, H), _rand(rng, H)
    outs, h = np_rnn(x, h0, w_ih, w_hh, bias, direction == "reverse", act)
    check_mil(lambda x_, h_: mb.rnn(x=x_, initial_h=h_, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                                    direction=direction, output_sequence=output_sequence, activation=act),
              {"x": x, "h": h0}, [outs if output_sequence else h[None], h], target, "rnn",
              fp16=target >= ct.target.iOS17)


# -- precision and validation ----------------------------------------------------------------

def test_fp16_accumulation_changes_lstm_numbers():
    """The NE profile (FP16 compute) gives different, FP16-close numbers from the FP32 reference."""
    rng = np.random.default_rng(10)
    s, b, I, H = 6, 2, 16, 16
    x, h0, c0 = _rand(rng, s, b, I, scale=1.0), _rand(rng, b, H), _rand(rng, b, H)
    w_ih, w_hh, bias = _rand(rng, 4 * H, I), _rand(rng, 4 * H, H), _rand(rng, 4 * H)
    outs, _, _ = np_lstm(x, h0, c0, w_ih, w_hh, bias, None, False)

    def build(x_, h_, c_):
        return mb.lstm(x=x_, initial_h=h_, initial_c=c_, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                       output_sequence=True)

    got = emulate_mil(build, {"x": x, "h": h0, "c": c0}, ct.target.iOS17, fp16=True,
                      compute_units=("CPU_AND_NE",))["CPU_AND_NE"][0]
    err = np.max(np.abs(got.astype(np.float64) - outs))
    assert 0 < err < 2e-2


def test_bad_activation_and_direction_raise_value_error():
    with pytest.raises(ValueError, match="recurrent_activation.*'swish'"):
        rec_ops._activation(FakeOpCall("lstm", recurrent_activation="swish"), "recurrent_activation")
    with pytest.raises(ValueError, match="direction.*'bidirectional'.*forward, reverse"):
        rec_ops._direction(FakeOpCall("gru", direction="bidirectional"), ("forward", "reverse"))
    assert rec_ops._activation(FakeOpCall("rnn", activation="SIGMOID_HARD"), "activation") is \
        rec_ops._hard_sigmoid


def test_lstm_packed_batch_first_sequence_converts_and_matches_torch():
    # coremltools' TestLSTMWithPackedSequence: its frontend gives the lstm zero initial states
    # sized by the longest sequence (10) for a batch of 3; Core ML runs it, the emulator must too
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(input_size=4, hidden_size=6, batch_first=True)

        def forward(self, batch_in, seq_lengths):
            packed = pack_padded_sequence(batch_in, seq_lengths, batch_first=True)
            out, _ = self.lstm(packed)
            return pad_packed_sequence(out, batch_first=True)[0]

    torch.manual_seed(0)
    model = Encoder().eval()
    x, lengths = torch.randn(3, 10, 4), torch.tensor([10, 5, 1], dtype=torch.int32)
    want = model(x, lengths).detach().numpy()
    ml = ct.convert(torch.jit.trace(model, (x, lengths)), convert_to="mlprogram",
                    inputs=[ct.TensorType(name="x", shape=x.shape), ct.TensorType(name="n", shape=(3,), dtype=np.int32)],
                    compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS15)
    (lstm,) = [op for op in ml._mil_program.functions["main"].operations if op.op_type == "lstm"]
    assert lstm.x.shape[1] == 3 and lstm.initial_h.op.op_type == "squeeze"  # the state is not [3, 6] by type
    (got,) = EmulatedModel(ml).predict({"x": x.numpy(), "n": lengths.numpy()}).values()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, ok", [(1, True), (5, True), (2, False)])
def test_lstm_initial_state_rows_broadcast_or_truncate(rows, ok):
    x = RNG_LSTM.standard_normal((4, 3, 2)).astype(np.float32)
    w_ih = RNG_LSTM.standard_normal((8, 2)).astype(np.float32)
    w_hh = RNG_LSTM.standard_normal((8, 2)).astype(np.float32)
    h0 = RNG_LSTM.standard_normal((rows, 2)).astype(np.float32)
    c0 = RNG_LSTM.standard_normal((rows, 2)).astype(np.float32)
    call = FakeOpCall("lstm", {"x": torch.from_numpy(x), "initial_h": torch.from_numpy(h0),
                               "initial_c": torch.from_numpy(c0), "weight_ih": torch.from_numpy(w_ih),
                               "weight_hh": torch.from_numpy(w_hh)}, n_outputs=3)
    if not ok:
        with pytest.raises(ValueError, match="'initial_h' has shape \\(2, 2\\); expected \\[3, ...\\]"):
            rec_ops.lstm(call)
        return
    _, h, c = rec_ops.lstm(call)
    # the same as feeding the rows a [3, H] state takes from it
    take = np.repeat(h0, 3, 0)[:3] if rows == 1 else h0[:3]
    takec = np.repeat(c0, 3, 0)[:3] if rows == 1 else c0[:3]
    call2 = FakeOpCall("lstm", {**call._t, "initial_h": torch.from_numpy(take), "initial_c": torch.from_numpy(takec)},
                       n_outputs=3)
    _, h2, c2 = rec_ops.lstm(call2)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(c, c2)


RNG_LSTM = np.random.default_rng(1)
