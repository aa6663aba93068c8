"""The "2+1D" residual block of the temporal-aware spatial autoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv3d, group_norm, pointwise_conv, spatial_conv


class TemporalConv(nn.Module):
    """GN -> SiLU -> 3x3x3 conv over (T, H, W), zero-initialised so that a fresh layer adds nothing."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.conv = Conv3d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class ResnetBlock(nn.Module):
    """Two (1,3,3) convs, each followed in video mode by a residual temporal conv.

    The released checkpoints hold a `conv3_tmp` in every block; only blocks that change width use it,
    so it is allocated only there.
    """

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = spatial_conv(c_in, c_out)
        self.conv1_tmp = TemporalConv(c_out, groups)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = spatial_conv(c_out, c_out)
        self.conv2_tmp = TemporalConv(c_out, groups)
        if c_in != c_out:
            self.nin_shortcut = pointwise_conv(c_in, c_out)
            self.conv3_tmp = TemporalConv(c_out, groups)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor, video: bool) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if video:
            h = h + self.conv1_tmp(h)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if video:
            h = h + self.conv2_tmp(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
            if video:
                x = x + self.conv3_tmp(x)
        return x + h
