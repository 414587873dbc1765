"""Additive attention mask with huge negative constants: FP16 cast overflow at convert time.

A small transformer encoder builds its causal mask as
``triu(ones) * torch.finfo(torch.float32).min``. Converting to FP16,
coremltools folds that constant into FP16 and numpy warns "overflow encountered
in cast": -3.4e38 becomes -inf. Softmax tolerates -inf here, so the output is
still right - but the same pattern with fully masked rows yields NaN (the
coremltools fix in PR #2669). Also the transformer model of the benchmarks
(``build(size="bench")``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._util import seeded

PITFALL = "P1"


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5 + mask
        y = (torch.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class MaskedEncoder(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2, seq: int = 16):
        super().__init__()
        self.seq = seq
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = torch.triu(torch.ones(t, t), diagonal=1) * torch.finfo(torch.float32).min
        x = self.embed(tokens) + self.pos[:, :t]
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(self.norm(x))


SIZES = {  # vocab, dim, heads, layers, tokens
    "small": (64, 32, 4, 2, 16),
    "bench": (512, 256, 8, 4, 128),
    "base": (1000, 768, 12, 12, 128),  # BERT-base's shape: how the bench ratios move with model size
}


def build(seed: int = 0, size: str = "small"):
    """``size="small"``: 2 layers, dim 32, 16 tokens; ``"bench"``: 4 layers, dim 256, 128 tokens;
    ``"base"``: 12 layers, dim 768, 128 tokens."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(repr, SIZES))}, got {size!r}")
    g = seeded(seed)
    vocab, dim, heads, layers, seq = SIZES[size]
    model = MaskedEncoder(vocab, dim, heads, layers, seq).eval()
    tokens = torch.randint(0, vocab, (1, seq), generator=g)
    return model, (tokens,), (f"Transformer encoder ({layers} layers, dim {dim}) with a causal mask built "
                              "from torch.finfo(float32).min: 'overflow encountered in cast' at FP16 conversion.")
