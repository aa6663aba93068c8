"""The temporal-aware spatial autoencoder: 8x in H and W, time unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, SpatialSelfAttention, TemporalAttention, TextContext
from .config import CMVAEConfig
from .layers import Downsample, Upsample, group_norm, spatial_conv
from .resnet import ResnetBlock


# Runs a function of frames or features (B, C, T, H, W) at 1/scale of the video's resolution on an input,
# for example tile by tile (`cmvae.tiling`): `local_map(fn, x, scale)` stands for `fn(x)`. The model
# passes a `LevelCall` as `fn`, which a local_map may also take apart (`cmvae.models.banded`).
LocalMap = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int], torch.Tensor]


@dataclass
class LevelCall:
    """One level of the spatial encoder or decoder, callable on the level's input.

    `owns_input`: the input is an intermediate of this forward pass that nothing reads after the
    level, so a local_map may free its memory once it has used it.
    """

    coder: SpatialEncoder | SpatialDecoder
    level: int
    text: TextContext | None
    video: bool
    owns_input: bool

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.coder.level(self.level, h, self.text, self.video)


def _local(call: LevelCall, x: torch.Tensor, scale: int, local_map: LocalMap | None) -> torch.Tensor:
    return call(x) if local_map is None else local_map(call, x, scale)


class Checkpointed(nn.Module):
    """Runs child blocks through activation checkpointing when `gradient_checkpointing` is set
    (diffusers' `enable_gradient_checkpointing` sets it and `_gradient_checkpointing_func`)."""

    gradient_checkpointing = False

    def run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)


def _cross_attentions(cfg: CMVAEConfig, channels: int, count: int, level: int) -> nn.ModuleList:
    if not cfg.has_text:
        return nn.ModuleList()
    patch = cfg.cross_attention_patch_sizes[level]
    return nn.ModuleList(
        CrossAttention(channels, cfg.context_dim, cfg.cross_attention_heads, cfg.cross_attention_head_dim, patch)
        for _ in range(count)
    )


class Level(nn.Module):
    """One resolution: residual blocks, each followed (with text) by a cross-attention, then a resampler."""

    def __init__(self, cfg: CMVAEConfig, c_in: int, c_out: int, num_blocks: int, level: int):
        super().__init__()
        widths = [c_in] + [c_out] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], widths[i + 1], cfg.norm_num_groups, cfg.dropout) for i in range(num_blocks)
        )
        self.attn = _cross_attentions(cfg, c_out, num_blocks, level)
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def forward(self, h: torch.Tensor, text: TextContext | None, video: bool, run) -> torch.Tensor:
        return self.resample(self.blocks(h, text, video, run))

    def blocks(self, h: torch.Tensor, text: TextContext | None, video: bool, run) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = run(block, h, video)
            if len(self.attn):
                h = h + run(self.attn[i], h, text)
        return h

    def resample(self, h: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class MidBlock(Checkpointed):
    """Residual block, spatial self-attention, temporal attention (video mode), residual block."""

    def __init__(self, cfg: CMVAEConfig, channels: int):
        super().__init__()
        groups = cfg.norm_num_groups
        self.block_1 = ResnetBlock(channels, channels, groups, cfg.dropout)
        self.attn_1 = SpatialSelfAttention(channels, groups)
        self.attn_1_tmp = TemporalAttention(channels, groups, cfg.max_relative_position)
        self.block_2 = ResnetBlock(channels, channels, groups, cfg.dropout)

    def forward(self, h: torch.Tensor, video: bool) -> torch.Tensor:
        h = self.run(self.block_1, h, video)
        h = self.run(self.attn_1, h)
        if video:
            h = self.run(self.attn_1_tmp, h)
        return self.run(self.block_2, h, video)


class SpatialEncoder(Checkpointed):
    """(B, 3, T, H, W) -> moments (B, 2*zc, T, H/8, W/8)."""

    def __init__(self, cfg: CMVAEConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multipliers
        self.conv_in = spatial_conv(cfg.in_channels, ch)
        in_widths = [ch] + [ch * m for m in mult[:-1]]
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            stage = Level(cfg, in_widths[level], ch * m, cfg.num_res_blocks, level)
            if level < len(mult) - 1:
                stage.downsample = Downsample(ch * m)
            self.down.append(stage)
        self.mid = MidBlock(cfg, ch * mult[-1])
        self.norm_out = group_norm(ch * mult[-1], cfg.norm_num_groups)
        self.conv_out = spatial_conv(ch * mult[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, text: TextContext | None, video: bool,
                local_map: LocalMap | None = None) -> torch.Tensor:
        """`local_map` runs each level (see `CrossModalVAE.encode`); the head sees the whole frame."""
        h = x
        for level in range(len(self.down)):
            h = _local(LevelCall(self, level, text, video, owns_input=level > 0), h, 2**level, local_map)
        return self.head(h, video)

    def level(self, level: int, h: torch.Tensor, text: TextContext | None, video: bool) -> torch.Tensor:
        """One resolution (frames first go through `conv_in`), ending in its downsample: convolutions and
        GroupNorms only, so each output depends on a neighbourhood and on the norms' statistics."""
        if level == 0:
            h = self.conv_in(h)
        return self.down[level](h, text, video, self.run)

    def head(self, h: torch.Tensor, video: bool) -> torch.Tensor:
        """Features -> moments, through the middle block, whose attention sees the whole frame."""
        h = self.mid(h, video)
        return self.conv_out(F.silu(self.norm_out(h)))


class SpatialDecoder(Checkpointed):
    """latent (B, zc, T, h, w) -> (B, 3, T, 8h, 8w). Levels run from the lowest resolution up;
    parameters are indexed by level, so `up.3` runs first."""

    def __init__(self, cfg: CMVAEConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multipliers
        self.conv_in = spatial_conv(cfg.latent_channels, ch * mult[-1])
        self.mid = MidBlock(cfg, ch * mult[-1])
        self.up = nn.ModuleList()
        c_in = ch * mult[-1]
        for level in reversed(range(len(mult))):
            stage = Level(cfg, c_in, ch * mult[level], cfg.num_res_blocks + 1, level)
            if level > 0:
                stage.upsample = Upsample(ch * mult[level])
            self.up.insert(0, stage)
            c_in = ch * mult[level]
        self.norm_out = group_norm(ch * mult[0], cfg.norm_num_groups)
        self.conv_out = spatial_conv(ch * mult[0], cfg.in_channels)

    def forward(self, z: torch.Tensor, text: TextContext | None, video: bool,
                local_map: LocalMap | None = None) -> torch.Tensor:
        """`local_map` runs each level (see `CrossModalVAE.decode`); the trunk sees the whole frame."""
        h = self.trunk(z, video)
        top = len(self.up) - 1
        for level in reversed(range(len(self.up))):
            scale = 2 ** min(level + 1, top)  # the level's input: the previous level before its upsample
            h = _local(LevelCall(self, level, text, video, owns_input=True), h, scale, local_map)
        return h

    def trunk(self, z: torch.Tensor, video: bool) -> torch.Tensor:
        """Latent -> features at its resolution, through the middle block (attention over the whole frame)."""
        return self.mid(self.conv_in(z), video)

    def level(self, level: int, h: torch.Tensor, text: TextContext | None, video: bool) -> torch.Tensor:
        """The previous level's upsample, then this resolution (ending, at full resolution, in the output
        layers): so that what passes between levels is the smaller tensor. Convolutions and GroupNorms
        only, as in the encoder."""
        if level < len(self.up) - 1:
            h = self.up[level + 1].resample(h)
        h = self.up[level].blocks(h, text, video, self.run)
        return self.conv_out(F.silu(self.norm_out(h))) if level == 0 else h
