"""Small building blocks shared by both stages: float32 normalisations and convolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .groupnorm import group_norm_rows, row_statistics_enabled


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, so half precision cannot overflow it.

    On a (B, C, T, H, W) tensor the statistics are pooled over all frames and positions. Under
    `groupnorm.row_statistics()` (inference in the pipeline) such tensors are normalised with
    statistics from per-row sums, which a band of rows reproduces exactly (`cmvae.models.groupnorm`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5 and row_statistics_enabled():
            return group_norm_rows(x, self)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # PyTorch's CPU kernel reads bfloat16 and computes in float32 itself: the same output, bit for
            # bit, as through a float32 copy, 8 times faster (benchmarks/default_model_speed.py)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` whose float32 inference on the CPU always runs through oneDNN.

    PyTorch sends float32 convolutions with batch x channels x frames x rows of at most 20480 (thin
    layers, the deeper levels, the temporal autoencoder) to a native kernel that unfolds the input into
    a buffer 9 or 27 times its size: on the default model that kernel took a third of the CPU time
    (benchmarks/default_model_speed.py). oneDNN needs no buffer and is several times faster there; it
    is also what bands of rows use (`banded.py`), so whole and banded levels round alike. Training
    (gradients needed) keeps PyTorch's own dispatch, as does `torch.backends.mkldnn.flags(enabled=False)`.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode == "zeros" and isinstance(self.padding, tuple):
            return conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
           padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """`F.conv3d` with numeric padding, through oneDNN where `onednn_applies`."""
    if onednn_applies(x, weight):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), list(dilation), groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for float32 CPU inference, where `torch.ops.aten.mkldnn_convolution` replaces `F.conv3d`."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=eps)


def spatial_conv(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> Conv3d:
    """A 2D 3x3 convolution applied to every frame: Conv3d with kernel (1, 3, 3)."""
    return Conv3d(c_in, c_out, kernel_size=(1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding))


def pointwise_conv(c_in: int, c_out: int) -> Conv3d:
    return Conv3d(c_in, c_out, kernel_size=1)


class Downsample(nn.Module):
    """Halves H and W: pad one pixel right and bottom, then a stride-2 (1,3,3) conv. Time is untouched."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = spatial_conv(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles H and W of every frame (nearest neighbour, never in time), then a (1,3,3) conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = spatial_conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
