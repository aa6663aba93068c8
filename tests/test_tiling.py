"""Spatial tiling: where tiles go, how they blend, shared GroupNorm statistics, and what the model tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmvae import CrossModalVAE
from cmvae.pipeline import PipelineSettings, VideoPipeline
from cmvae.tiling import TileSettings, tile_spans, tiled_apply


@pytest.mark.parametrize("size, tile, overlap, align",
                         [(100, 32, 8, 1), (200, 64, 16, 8), (37, 16, 4, 1), (64, 64, 8, 8)])
def test_tiles_cover_the_range_with_aligned_starts(size, tile, overlap, align):
    spans = tile_spans(size, tile, overlap, align)
    assert spans[0][0] == 0 and spans[-1][1] == size
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert end - start == tile and start % align == 0
        assert next_start <= end - overlap  # neighbours overlap by at least `overlap`
        assert next_start > start
    assert all(end - start == min(tile, size) for start, end in spans)


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="tile overlap"):
        TileSettings(tile=64, overlap=64)


def test_blending_reproduces_a_pointwise_function_exactly():
    x = torch.randn(1, 3, 2, 50, 70)
    out = tiled_apply(lambda t: t * 2 + 1, x, tile=24, overlap=8)
    torch.testing.assert_close(out, x * 2 + 1)


def test_functions_that_rescale_are_blended_at_their_scale():
    x = torch.randn(1, 2, 1, 40, 56)
    upsample = lambda t: F.interpolate(t, scale_factor=(1, 4, 4), mode="nearest")  # noqa: E731
    torch.testing.assert_close(tiled_apply(upsample, x, tile=16, overlap=4), upsample(x))
    pool = lambda t: F.avg_pool3d(t, (1, 8, 8))  # noqa: E731
    torch.testing.assert_close(tiled_apply(pool, x, tile=16, overlap=8, align=8), pool(x))


class PointwiseNet(nn.Module):
    """1x1 convolutions and GroupNorms: no spatial context, so only the norms' statistics tell tiles apart."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv3d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv3d(8, 3, 1)

    def forward(self, x):
        return self.conv2(F.silu(self.norm(self.conv1(x))))


def test_shared_statistics_make_tiles_exact_where_per_tile_statistics_do_not():
    torch.manual_seed(0)
    net = PointwiseNet()
    x = torch.randn(1, 3, 2, 48, 64)
    x[..., :24, :] += 3  # the top half differs, so per-tile statistics differ from the frame's
    with torch.no_grad():
        full = net(x)
        shared = tiled_apply(net, x, tile=24, overlap=8, norm_root=net)
        per_tile = tiled_apply(net, x, tile=24, overlap=8)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    assert (per_tile - full).abs().max() > 0.1
    assert net.norm.forward.__func__ is nn.GroupNorm.forward  # the patch is gone afterwards


def test_the_model_tiles_only_its_full_resolution_levels():
    """`local_map` gets the frames when encoding and the 1/8-resolution features when decoding; the
    identity map changes nothing."""
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny").eval()
    video = torch.rand(1, 3, 8, 32, 48) * 2 - 1
    seen = []

    def identity(fn, x):
        seen.append(tuple(x.shape))
        return fn(x)

    with torch.no_grad():
        latent = model.encode(video).latent_dist.mode()
        torch.testing.assert_close(model.encode(video, local_map=identity).latent_dist.mode(), latent)
        torch.testing.assert_close(model.decode(latent, local_map=identity).sample, model.decode(latent).sample)
    width = model.cfg.base_channels * model.cfg.channel_multipliers[-1]
    assert seen == [(1, 3, 8, 32, 48), (1, width, 8, 4, 6)]


def test_pipeline_tiles_large_frames_and_keeps_their_size():
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny")
    frames = (torch.rand(4, 40, 72, 3) * 255).to(torch.uint8).numpy()
    untiled = VideoPipeline(model, PipelineSettings(device="cpu", tile=0)).reconstruct_array(frames)
    tiled = VideoPipeline(model, PipelineSettings(device="cpu", tile=32, tile_overlap=16)).reconstruct_array(frames)
    assert tiled.shape == untiled.shape == (4, 40, 72, 3) and np.isfinite(tiled).all()
    assert not np.allclose(tiled, untiled)  # tiled indeed: per-tile GroupNorm statistics change the output


def test_tiles_share_statistics_unless_the_command_line_says_otherwise():
    from cmvae.cli import build_parser

    assert PipelineSettings().shared_norm
    assert build_parser().parse_args(["reconstruct", "in.mp4"]).shared_norm
    assert not build_parser().parse_args(["reconstruct", "in.mp4", "--no-shared-norm"]).shared_norm
