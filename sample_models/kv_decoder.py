"""A decoder with a KV cache (Core ML states): right at the first steps, FP16 overflow once enough cache slots fill.

A small LLaMA-style decoder written here (2 blocks of RMSNorm + rotary attention
+ SiLU MLP, dim 64, 4 heads) decodes one token per call. Each attention keeps
its keys and values in ``k_cache`` / ``v_cache`` buffers of ``MAX_LEN`` slots,
written in place at position ``pos`` (``self.k_cache[:, :, p:p + 1] = k``, as in
Apple's stateful-model guide); converted at iOS18 they become Core ML states.
The buffers are FP16 in torch too, because Core ML states hold FP16 only:
torch's cache and the model's state store the same values.

``config="healthy"``: every block uses ``torch.softmax`` (Core ML's softmax
subtracts the row maximum), and every step is right at FP16.

``config="overflow"`` (the pitfall): block 1 writes its softmax by hand,
``exp(scores) / exp(scores).sum(-1)``, without subtracting the maximum, and its
query/key projections share a bias direction (an "attention sink": every
filled slot scores about 9). Each filled slot adds about e^9 ~ 8100 to the
denominator, so the FP16 sum passes 65504 once about 9 slots are filled:
the first steps are right, later steps go wrong at FP16, FP32 torch is fine.
Fixes: keep ``blocks.1.attn``'s exp / reduce_sum / real_div in FP32, or use
``torch.softmax``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._util import seeded

PITFALL = "P1"
MAX_LEN = 16
CONFIGS = ("healthy", "overflow")
#: the module whose attention overflows in the "overflow" configuration
OVERFLOW_MODULE = "blocks.1.attn"
#: the shared query/key bias of that module: every filled cache slot scores about SINK_LOGIT
SINK_LOGIT = 9.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    """Rotary position embedding (half-split pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CachedAttention(nn.Module):
    """Multi-head attention over a KV cache of ``max_len`` slots, one new token per call."""

    def __init__(self, dim: int, heads: int, max_len: int, naive_softmax: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.naive_softmax = naive_softmax
        self.q = nn.Linear(dim, dim, bias=naive_softmax)
        self.k = nn.Linear(dim, dim, bias=naive_softmax)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        shape = (1, heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, x, cos, sin, pos, mask):
        b, t, d = x.shape
        q = rotate(self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        p = pos[0]
        self.k_cache[:, :, p:p + 1] = k.half()
        self.v_cache[:, :, p:p + 1] = v.half()
        scores = (q @ self.k_cache.to(q.dtype).transpose(-1, -2)) * self.head_dim ** -0.5 + mask
        if self.naive_softmax:
            e = scores.exp()
            weights = e / e.sum(-1, keepdim=True)
        else:
            weights = torch.softmax(scores, dim=-1)
        y = (weights @ self.v_cache.to(q.dtype)).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, naive_softmax: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = CachedAttention(dim, heads, max_len, naive_softmax)
        self.norm2 = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cos, sin, pos, mask):
        x = x + self.attn(self.norm1(x), cos, sin, pos, mask)
        return x + self.mlp(self.norm2(x))


class KVDecoder(nn.Module):
    """``forward(token (1, 1) int, pos (1,) int) -> logits (1, 1, vocab)``; caches are updated in place."""

    def __init__(self, vocab: int = 64, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = MAX_LEN,
                 naive_softmax_layers: tuple = ()):
        super().__init__()
        self.max_len = max_len
        head_dim = dim // heads
        self.embed = nn.Embedding(vocab, dim)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(max_len).float()[:, None] * inv_freq[None]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.blocks = nn.ModuleList([Block(dim, heads, max_len, i in naive_softmax_layers) for i in range(layers)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, token, pos):
        x = self.embed(token)
        cos, sin = self.cos[pos.long()][:, None], self.sin[pos.long()][:, None]
        # additive mask over the cache: slots after ``pos`` are empty (-1e4 fits FP16)
        mask = torch.where(torch.arange(self.max_len) <= pos, 0.0, -1e4).view(1, 1, 1, self.max_len)
        for block in self.blocks:
            x = block(x, cos, sin, pos, mask)
        return self.head(self.norm(x))

    def reset_cache(self) -> None:
        """Empty every KV cache (a new sequence); Core ML's ``make_state()`` starts from zeros too."""
        with torch.no_grad():
            for name, buf in self.named_buffers():
                if name.endswith(("k_cache", "v_cache")):
                    buf.zero_()


def _add_attention_sink(attn: CachedAttention, logit: float) -> None:
    """Give queries and keys one shared direction in the slowest rotary pair, so every filled slot scores
    about ``logit`` whatever its position (rotation there is below 1e-3 rad over MAX_LEN positions)."""
    half = attn.head_dim // 2
    c = math.sqrt(logit * math.sqrt(attn.head_dim))
    with torch.no_grad():
        attn.q.weight.mul_(0.05)
        attn.k.weight.mul_(0.05)
        attn.q.bias.zero_()
        attn.k.bias.zero_()
        for h in range(attn.heads):
            attn.q.bias[h * attn.head_dim + half - 1] = c
            attn.k.bias[h * attn.head_dim + half - 1] = c


def tokens(n: int, seed: int = 0, vocab: int = 64) -> list[int]:
    """``n`` fixed pseudo-random token ids."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def step_inputs(n: int = MAX_LEN, seed: int = 0, max_len: int = MAX_LEN) -> list[dict]:
    """Inputs of ``n`` decoding steps, one dict ``{"token", "pos"}`` per step (``n <= max_len``, the cache size)."""
    if not 1 <= n <= max_len:
        raise ValueError(f"n must be between 1 and max_len={max_len} (the cache has {max_len} slots), got {n}")
    return [{"token": torch.tensor([[t]]), "pos": torch.tensor([i])} for i, t in enumerate(tokens(n, seed))]


def build(seed: int = 0, config: str = "healthy", max_len: int = MAX_LEN):
    """``config="healthy"``: right at every step; ``"overflow"``: block 1's hand-written softmax overflows FP16
    once about 9 cache slots are filled. ``max_len``: cache slots (decoding steps it can take)."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {', '.join(map(repr, CONFIGS))}, got {config!r}")
    seeded(seed)
    overflow = config == "overflow"
    model = KVDecoder(max_len=max_len, naive_softmax_layers=(1,) if overflow else ()).eval()
    if overflow:
        _add_attention_sink(model.blocks[1].attn, SINK_LOGIT)
    first = step_inputs(1, seed)[0]
    example = (first["token"], first["pos"])
    if overflow:
        text = (f"KV-cache decoder (2 blocks, dim 64, {max_len} cache slots as Core ML states) whose block 1 "
                "computes softmax as exp(s) / sum(exp(s)) without subtracting the maximum: each filled slot adds "
                f"about e^{SINK_LOGIT} to the sum, which passes FP16's 65504 after about 9 decoding steps.")
    else:
        text = (f"KV-cache decoder (2 blocks of RMSNorm + rotary attention + MLP, dim 64) with {max_len} cache "
                "slots updated in place: Core ML states at iOS18, right at every decoding step.")
    return model, example, text
