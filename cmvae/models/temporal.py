"""The temporal autoencoder: 4x in time on the spatial latent, H and W unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, TextContext
from .config import CMVAEConfig
from .layers import Conv3d, group_norm
from .spatial import Checkpointed


class SamePadConv3d(nn.Module):
    """A 3x3x3 conv "same"-padded by replicating edges: of the `k - s` padding on each dimension,
    the larger half goes in front (so a stride-2 conv pads time 1 in front, 0 behind)."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int] = (1, 1, 1), kernel: int = 3):
        super().__init__()
        self.conv = Conv3d(c_in, c_out, kernel_size=kernel, stride=stride)
        self.padding: list[int] = []
        for s in reversed(stride):  # F.pad lists the last dimension first
            total = kernel - s
            self.padding += [total - total // 2, total // 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class TemporalResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, added to the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(channels, groups)
        self.conv1 = SamePadConv3d(channels, channels)
        self.norm2 = group_norm(channels, groups)
        self.conv2 = SamePadConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _maybe_cross_attention(cfg: CMVAEConfig, channels: int) -> nn.ModuleList:
    if not cfg.has_text:
        return nn.ModuleList()
    attention = CrossAttention(channels, cfg.context_dim, cfg.cross_attention_heads, cfg.cross_attention_head_dim, 1)
    return nn.ModuleList([attention])


class TemporalDownStage(nn.Module):
    def __init__(self, cfg: CMVAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.down = SamePadConv3d(c_in, c_out, stride=(2, 1, 1))
        self.res = TemporalResBlock(c_out, cfg.norm_num_groups)
        self.attn = _maybe_cross_attention(cfg, c_out)


class TemporalUpStage(nn.Module):
    def __init__(self, cfg: CMVAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, kernel_size=3, stride=(2, 1, 1), padding=1, output_padding=(1, 0, 0))
        self.res1 = TemporalResBlock(c_out, cfg.norm_num_groups)
        self.attn1 = _maybe_cross_attention(cfg, c_out)
        self.res2 = TemporalResBlock(c_out, cfg.norm_num_groups)
        self.attn2 = _maybe_cross_attention(cfg, c_out)


def _add_cross_attention(attn: nn.ModuleList, h: torch.Tensor, text: TextContext | None, run) -> torch.Tensor:
    return h + run(attn[0], h, text) if len(attn) else h


class TemporalEncoder(Checkpointed):
    """Spatial latent (B, zc, T, h, w) -> moments (B, 2*zc, T/4, h, w)."""

    def __init__(self, cfg: CMVAEConfig):
        super().__init__()
        hc, zc = cfg.temporal_channels, cfg.latent_channels
        self.conv_in = SamePadConv3d(zc, hc)
        self.mid_blocks = nn.ModuleList(
            TemporalDownStage(cfg, hc * 2**j, hc * 2 ** (j + 1)) for j in range(cfg.temporal_stages)
        )
        top = hc * 2**cfg.temporal_stages
        self.final_block = nn.Sequential(group_norm(top, cfg.norm_num_groups), nn.SiLU(), SamePadConv3d(top, 2 * zc))

    def forward(self, z: torch.Tensor, text: TextContext | None) -> torch.Tensor:
        h = self.conv_in(z)
        for stage in self.mid_blocks:
            h = self.run(stage.res, stage.down(h))
            h = _add_cross_attention(stage.attn, h, text, self.run)
        return self.final_block(h)


class TemporalDecoder(Checkpointed):
    """Latent (B, zc, T/4, h, w) -> spatial latent (B, zc, T, h, w)."""

    def __init__(self, cfg: CMVAEConfig):
        super().__init__()
        hc, zc, stages = cfg.temporal_channels, cfg.latent_channels, cfg.temporal_stages
        top = hc * 2**stages
        self.conv_in = SamePadConv3d(zc, top)
        widths = [top] + [hc * 2 ** (stages - j) for j in range(stages)]  # 4hc, 4hc, 2hc for 4x
        self.mid_blocks = nn.ModuleList(TemporalUpStage(cfg, widths[j], widths[j + 1]) for j in range(stages))
        self.conv_last = SamePadConv3d(widths[-1], zc)

    def forward(self, z: torch.Tensor, text: TextContext | None) -> torch.Tensor:
        h = self.conv_in(z)
        for stage in self.mid_blocks:
            h = self.run(stage.res1, stage.up(h))
            h = _add_cross_attention(stage.attn1, h, text, self.run)
            h = self.run(stage.res2, h)
            h = _add_cross_attention(stage.attn2, h, text, self.run)
        return self.conv_last(h)
