"""Recurrent layers: lstm, gru, rnn.

Semantics: coremltools ``ops/defs/iOS15/recurrent.py`` (FP32 only), iOS17 (same
ops, FP16 allowed) and iOS18 ``gru`` (``reset_after``, ``input_bias``).

* ``x`` is ``[s, b, I]``; states are ``[b, DIRECTIONS*H]``. An lstm's initial state
  with another leading size is read as Core ML reads a ``[b, ...]`` buffer: size 1
  broadcasts over the batch, a larger one gives its first ``b`` rows. coremltools'
  torch frontend makes such states for packed sequences (zeros sized by the longest
  sequence, ``TestLSTMWithPackedSequence``), and Core ML runs them.
* Gate layouts (rows of the weights, entries of the biases):
  ``lstm`` ``[input, forget, output, cell]`` (peephole ``[input, forget, output]``);
  ``gru`` ``[reset, output(new), update]``; ``rnn`` one block.
* ``lstm``: ``i, f = ra(Wx + Rh + b + p * c_prev)``, ``z = ca(Wx + Rh + b)``,
  ``c = f * c_prev + i * z`` (then clipped to ``[-clip, clip]`` when ``clip`` is given),
  ``o = ra(Wx + Rh + b + p_o * c)``, ``h = o * act(c)``.
* ``gru`` (iOS15/17, and iOS18 with ``reset_after=False``): the reset gate
  multiplies the hidden state *before* the recurrent matmul,
  ``o = act(W_o x + R_o (r * h) + b_o)``, which is what coremltools' on-device
  tests check (the docstring's ``r_t * W_ho h_{t-1}`` is ambiguous; the torch
  frontend lowers torch GRUs to a loop for this reason). iOS18 ``reset_after=True``
  applies it after: ``o = act(W_o x + b_in + r * (R_o h + b_hn))`` with
  ``input_bias`` outside and ``bias`` inside (torch parity).
  ``h = (1 - z) * o + z * h_prev``.
* ``direction="reverse"`` walks the sequence backwards and emits outputs in the
  order it computes them; ``bidirectional`` (lstm only) emits the backward
  outputs aligned with the input time steps, so ``output[t] = [fwd_t, bwd_t]``,
  and its last-step output is ``[fwd final, bwd final]``.

Time is sequential: one Python iteration per step, each step vectorised over the
batch. Matmuls go through :mod:`..numerics` with the profile's accumulation
dtype (the input projection of every step in one call); gate arithmetic runs in
the op's compute dtype, and the carried state stays in that dtype.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..registry import kernel


def _hard_sigmoid(v):
    return torch.clamp(v * 0.2 + 0.5, 0.0, 1.0)


# Activations with their default parameters (scaled_tanh alpha=beta=1, linear alpha=1 beta=0,
# hard_sigmoid alpha=0.2 beta=0.5), as the ops take no parameters.
_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "scaled_tanh": torch.tanh,
    "relu": torch.relu,
    "linear": lambda v: v,
    "hard_sigmoid": _hard_sigmoid,
    "sigmoid_hard": _hard_sigmoid,
}


def _activation(call, name: str):
    v = call.str(name)
    fn = _ACTIVATIONS.get(v.lower())
    if fn is None:
        raise ValueError(
            f"{call.op.op_type} input {name!r} is {v!r}; expected one of {', '.join(sorted(_ACTIVATIONS))}"
        )
    return fn


def _direction(call, allowed) -> str:
    d = call.str("direction")
    if d not in allowed:
        raise ValueError(f"{call.op.op_type} input 'direction' is {d!r}; expected one of {', '.join(allowed)}")
    return d


def _weights(call, ih: str, hh: str, gates: int, x: torch.Tensor):
    w_ih = call.tensor(ih)
    w_hh = call.tensor(hh)
    if w_ih is None or w_hh is None:
        raise ValueError(f"{call.op.op_type} needs inputs {ih!r} and {hh!r}")
    hidden = w_hh.shape[1]
    if w_hh.ndim != 2 or w_ih.ndim != 2 or w_hh.shape[0] != gates * hidden or w_ih.shape[0] != gates * hidden \
            or w_ih.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{call.op.op_type}: {ih!r} must be [{gates}*H, I] and {hh!r} [{gates}*H, H] with I={x.shape[-1]}, "
            f"got {tuple(w_ih.shape)} and {tuple(w_hh.shape)}"
        )
    return w_ih, w_hh, hidden


def _input_projection(call, x: torch.Tensor, w_ih: torch.Tensor, bias) -> torch.Tensor:
    """``x @ W_ih^T + bias`` for every time step at once, in the accumulation dtype: [s, b, G*H]."""
    s, b, i = x.shape
    y = numerics.linear(x.reshape(s * b, i), w_ih, bias, call.accumulate)
    return y.reshape(s, b, -1)


def _recurrent(call, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return numerics.linear(h, w, None, call.accumulate)


def _check_x(call, x):
    if x.ndim != 3:
        raise ValueError(f"{call.op.op_type} input 'x' must be [seq, batch, input], got shape {tuple(x.shape)}")


def _one_direction(call):
    """What gru and rnn read first: x (checked), compute dtype, reverse?, output_sequence."""
    x = call.tensor("x")
    _check_x(call, x)
    reverse = _direction(call, ("forward", "reverse")) == "reverse"
    return x, call.compute_dtype, reverse, call.bool("output_sequence")


# -- lstm ----------------------------------------------------------------------------------

def _initial_state(call, name: str, batch: int) -> torch.Tensor:
    """``initial_h`` / ``initial_c`` as ``[batch, width]`` (see the module docstring)."""
    s = call.tensor(name)
    s = s.reshape(-1, s.shape[-1]) if s.ndim != 2 else s
    if s.shape[0] == batch:
        return s
    if s.shape[0] == 1:
        return s.expand(batch, -1)
    if s.shape[0] > batch:
        return s[:batch]
    raise ValueError(f"{call.op.op_type} input {name!r} has shape {tuple(s.shape)}; expected [{batch}, ...] "
                     f"for a batch of {batch} (x has shape [seq, {batch}, input])")


def _lstm_direction(call, x, h, c, w_ih, w_hh, bias, peephole, reverse, ra, ca, act, clip):
    dt = call.compute_dtype
    hidden = w_hh.shape[1]
    xp = _input_projection(call, x, w_ih, bias)
    if peephole is not None:
        p_i, p_f, p_o = peephole.reshape(3, hidden).unbind(0)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs = []
    for t in steps:
        g = (xp[t] + _recurrent(call, h, w_hh)).to(dt)
        gi, gf, go, gz = g.split(hidden, dim=-1)
        if peephole is not None:
            gi = gi + c * p_i
            gf = gf + c * p_f
        i = ra(gi)
        f = ra(gf)
        z = ca(gz)
        c = f * c + i * z
        if clip is not None:
            c = torch.clamp(c, -clip, clip)
        if peephole is not None:
            go = go + c * p_o
        o = ra(go)
        h = o * act(c)
        outs.append(h)
    return outs, h, c


@kernel("lstm", family="recurrent")
def lstm(call):
    x = call.tensor("x")
    _check_x(call, x)
    direction = _direction(call, ("forward", "reverse", "bidirectional"))
    output_sequence = call.bool("output_sequence")
    ra = _activation(call, "recurrent_activation")
    ca = _activation(call, "cell_activation")
    act = _activation(call, "activation")
    clip = call.float("clip") if call.has("clip") else None
    h0 = _initial_state(call, "initial_h", x.shape[1])
    c0 = _initial_state(call, "initial_c", x.shape[1])
    w_ih, w_hh, hidden = _weights(call, "weight_ih", "weight_hh", 4, x)
    bias = call.tensor("bias")
    peephole = call.tensor("peephole")
    if direction != "bidirectional":
        outs, h, c = _lstm_direction(call, x, h0, c0, w_ih, w_hh, bias, peephole, direction == "reverse",
                                     ra, ca, act, clip)
        seq = torch.stack(outs, 0) if output_sequence else h.unsqueeze(0)
        return seq, h, c
    if not (call.has("weight_ih_back") and call.has("weight_hh_back")):
        raise ValueError("lstm with direction 'bidirectional' needs inputs 'weight_ih_back' and 'weight_hh_back'")
    wb_ih, wb_hh, _ = _weights(call, "weight_ih_back", "weight_hh_back", 4, x)
    if h0.shape[-1] != 2 * hidden or c0.shape[-1] != 2 * hidden:
        raise ValueError(
            f"bidirectional lstm needs initial_h/initial_c of shape [b, {2 * hidden}], "
            f"got {tuple(h0.shape)} and {tuple(c0.shape)}"
        )
    outs_f, h_f, c_f = _lstm_direction(call, x, h0[:, :hidden], c0[:, :hidden], w_ih, w_hh, bias, peephole,
                                       False, ra, ca, act, clip)
    outs_b, h_b, c_b = _lstm_direction(call, x, h0[:, hidden:], c0[:, hidden:], wb_ih, wb_hh,
                                       call.tensor("bias_back"), call.tensor("peephole_back"), True,
                                       ra, ca, act, clip)
    h = torch.cat([h_f, h_b], -1)
    c = torch.cat([c_f, c_b], -1)
    if output_sequence:
        # backward outputs were produced last-step-first: realign them with the input time steps
        seq = torch.cat([torch.stack(outs_f, 0), torch.stack(outs_b[::-1], 0)], -1)
    else:
        seq = h.unsqueeze(0)
    return seq, h, c


# -- gru -----------------------------------------------------------------------------------

@kernel("gru", family="recurrent")
def gru(call):
    x, dt, reverse, output_sequence = _one_direction(call)
    ra = _activation(call, "recurrent_activation")
    act = _activation(call, "activation")
    reset_after = call.bool("reset_after", False)  # iOS18; documented "defaults to False", not declared
    h = call.tensor("initial_h")
    w_ih, w_hh, hidden = _weights(call, "weight_ih", "weight_hh", 3, x)
    bias = call.tensor("bias")
    input_bias = call.tensor("input_bias")  # iOS18
    w_hr, w_ho, w_hz = w_hh.split(hidden, dim=0)
    if reset_after:
        xp = _input_projection(call, x, w_ih, input_bias)
        hidden_bias = bias
    else:
        if bias is not None and input_bias is not None:
            in_bias = bias + input_bias
        else:
            in_bias = bias if bias is not None else input_bias
        xp = _input_projection(call, x, w_ih, in_bias)
        w_hrz = torch.cat([w_hr, w_hz], 0)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs = []
    for t in steps:
        xr, xo, xz = xp[t].split(hidden, dim=-1)
        if reset_after:
            hp = numerics.linear(h, w_hh, hidden_bias, call.accumulate)
            hr, ho, hz = hp.split(hidden, dim=-1)
            r = ra((xr + hr).to(dt))
            z = ra((xz + hz).to(dt))
            o = act(xo.to(dt) + r * ho.to(dt))
        else:
            hr, hz = _recurrent(call, h, w_hrz).split(hidden, dim=-1)
            r = ra((xr + hr).to(dt))
            z = ra((xz + hz).to(dt))
            o = act((xo + _recurrent(call, r * h, w_ho)).to(dt))
        h = (1.0 - z) * o + z * h
        outs.append(h)
    seq = torch.stack(outs, 0) if output_sequence else h.unsqueeze(0)
    return seq, h


# -- rnn -----------------------------------------------------------------------------------

@kernel("rnn", family="recurrent")
def rnn(call):
    x, dt, reverse, output_sequence = _one_direction(call)
    act = _activation(call, "activation")
    h = call.tensor("initial_h")
    w_ih, w_hh, _ = _weights(call, "weight_ih", "weight_hh", 1, x)
    xp = _input_projection(call, x, w_ih, call.tensor("bias"))
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs = []
    for t in steps:
        h = act((xp[t] + _recurrent(call, h, w_hh)).to(dt))
        outs.append(h)
    seq = torch.stack(outs, 0) if output_sequence else h.unsqueeze(0)
    return seq, h
