"""The three attentions of the network: spatial self-attention, temporal attention, text cross-attention."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm32, group_norm, pointwise_conv


class Region(NamedTuple):
    """Where a layer's input sits in the whole frame, when the model runs in tiles or bands: its span and
    the part of it whose output is kept, as fractions [start, end) of the frame's height and width.
    `kept_rows=None`: nothing of this run is kept (a trial run on a crop)."""

    rows: tuple[float, float]
    cols: tuple[float, float]
    kept_rows: tuple[float, float] | None
    kept_cols: tuple[float, float] | None


WHOLE_FRAME = Region((0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0))
NOTHING_KEPT = Region((0.0, 1.0), (0.0, 1.0), None, None)
_region: ContextVar[Region] = ContextVar("cmvae_region", default=WHOLE_FRAME)


@contextmanager
def in_region(region: Region) -> Iterator[None]:
    """Tell recording callbacks where the layers called within sit (set by tiling and banding)."""
    token = _region.set(region)
    try:
        yield
    finally:
        _region.reset(token)


# Called, while `recording_cross_attention` is active, with (layer, probabilities (N, heads, patches, L)
# float32, mask (N, L), patch grid (b, t, rows, cols), region). Only set by that context manager.
AttentionCallback = Callable[["CrossAttention", torch.Tensor, torch.Tensor, tuple[int, int, int, int], Region], None]
_recorders: list[AttentionCallback] = []


@contextmanager
def recording_cross_attention(callback: AttentionCallback) -> Iterator[None]:
    """While active, every `CrossAttention` recomputes its softmax weights from the same q and k
    (SDPA does not return them) and hands them to `callback`; the layer's output is unchanged."""
    _recorders.append(callback)
    try:
        yield
    finally:
        _recorders.remove(callback)


class TextContext(NamedTuple):
    """Caption embeddings `(N, L, D)` and their mask `(N, L)` (1 keeps a token, 0 drops it), one row per sample."""

    embeddings: torch.Tensor
    mask: torch.Tensor

    def repeat_frames(self, frames: int) -> TextContext:
        """One row per frame: `(N*frames, L, D)`, each sample's caption repeated for its frames."""
        if frames == 1:
            return self
        return TextContext(self.embeddings.repeat_interleave(frames, 0), self.mask.repeat_interleave(frames, 0))


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, H*W, C)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)


def _from_tokens(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, c, t, h, w = shape
    return tokens.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


def _linear(x: torch.Tensor, conv: nn.Conv3d | nn.Conv1d) -> torch.Tensor:
    """A pointwise conv applied to channel-last tokens."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class SpatialSelfAttention(nn.Module):
    """One head over the H*W positions of each frame, through scaled_dot_product_attention."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = pointwise_conv(channels, channels)
        self.k = pointwise_conv(channels, channels)
        self.v = pointwise_conv(channels, channels)
        self.proj_out = pointwise_conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = _to_tokens(self.norm(x))  # (B*T, HW, C)
        q, k, v = (_linear(tokens, conv).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + _from_tokens(_linear(out, self.proj_out), x.shape)


class RelativePosition(nn.Module):
    """A learned vector per clamped offset `s - t` between a query frame t and a key frame s."""

    def __init__(self, channels: int, max_distance: int):
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, channels))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, frames: int) -> torch.Tensor:
        """(T, T, C) table whose [t, s] entry belongs to offset s - t."""
        positions = torch.arange(frames, device=self.embeddings_table.device)
        offsets = (positions[None, :] - positions[:, None]).clamp(-self.max_distance, self.max_distance)
        return self.embeddings_table[offsets + self.max_distance]


class TemporalAttention(nn.Module):
    """One head of width C over the frames of each spatial position, with relative-position terms.

    The softmax probabilities are needed for the value term, so the small T x T matrix is explicit.
    """

    def __init__(self, channels: int, groups: int, max_relative_position: int):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.relative_position_k = RelativePosition(channels, max_relative_position)
        self.relative_position_v = RelativePosition(channels, max_relative_position)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        for layer in (self.qkv, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)  # (N, C, T): one sequence per position
        q, k, v = self.qkv(self.norm(seq)).chunk(3, dim=1)
        scale = c**-0.25
        q, k = q * scale, k * scale
        weights = torch.einsum("nct,ncs->nts", q, k)
        # The released model adds the key term transposed ([s, t] into [t, s]); kept as released.
        weights = weights + torch.einsum("nct,tsc->nst", q, self.relative_position_k(t).to(q.dtype))
        probs = weights.float().softmax(dim=-1).to(v.dtype)
        out = torch.einsum("nts,ncs->nct", probs, v)
        out = out + torch.einsum("nts,tsc->nct", probs, self.relative_position_v(t).to(v.dtype))
        out = self.proj_out(out)
        return x + out.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)


class CrossAttention(nn.Module):
    """Patches of each frame attend to the caption's tokens; returns the term its caller adds.

    A `p x p` patch is one query token with features ordered (row-in-patch, column-in-patch, channel).
    """

    def __init__(self, channels: int, context_dim: int, heads: int, head_dim: int, patch_size: int):
        super().__init__()
        self.heads = heads
        self.patch_size = patch_size
        features = channels * patch_size * patch_size
        inner = heads * head_dim
        self.norm = LayerNorm32(features)
        self.to_q = nn.Linear(features, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, features))

    def forward(self, x: torch.Tensor, text: TextContext) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 4, 6, 1)
        tokens = self.norm(patches.reshape(b * t, (h // p) * (w // p), p * p * c))
        text = text.repeat_frames(t)
        q = self._split_heads(self.to_q(tokens))
        context = text.embeddings.to(tokens.dtype)
        k, v = self._split_heads(self.to_k(context)), self._split_heads(self.to_v(context))
        # Masked keys get the most negative finite value, as released (a fully masked row stays finite).
        bias = torch.zeros(text.mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(text.mask <= 0.5, torch.finfo(q.dtype).min)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if _recorders:
            self._report(q, k, bias, text.mask, (b, t, h // p, w // p))
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (B*T, tokens, p*p*c)
        out = out.reshape(b, t, h // p, w // p, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, c, t, h, w)

    def _report(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                grid: tuple[int, int, int, int]) -> None:
        # SDPA's default scale, 1/sqrt(head_dim), in float32 whatever the compute dtype
        scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = (scores + bias.float()).softmax(dim=-1)
        for callback in list(_recorders):
            callback(self, probs, mask, grid, _region.get())

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.heads, -1).transpose(1, 2)
