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

from random_models import with_temporal_layers


@pytest.mark.parametrize("size, tile, overlap, align",
                         [(100, 32, 8, 1), (200, 64, 16, 8), (37, 16, 4, 1), (64, 64, 8, 8), (352, 256, 64, 2),
                          (1000, 256, 64, 8), (864, 256, 64, 2), (100, 36, 30, 8)])
def test_tiles_cover_the_range_with_aligned_starts(size, tile, overlap, align):
    spans = tile_spans(size, tile, overlap, align)
    tile = tile // align * align  # the tile is rounded down to `align`, the overlap kept below it
    overlap = min(overlap, tile - align)
    assert spans[0][0] == 0 and spans[-1][1] == size
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start % align == 0
        assert next_start <= end - overlap  # neighbours overlap by at least `overlap`
        assert next_start > start
    lengths = {end - start for start, end in spans}
    assert len(lengths) == 1 and lengths.pop() <= tile
    # the fewest tiles: one fewer could not cover the range with that overlap
    assert (len(spans) - 1) * (tile - overlap) + overlap < size or len(spans) == 1


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


@pytest.mark.parametrize("norm", ["exact", "first-pass"])
def test_shared_statistics_make_tiles_exact_where_per_tile_statistics_do_not(norm):
    torch.manual_seed(0)
    net = PointwiseNet()
    x = torch.randn(1, 3, 2, 48, 64)
    x[..., :24, :] += 3  # the top half differs, so per-tile statistics differ from the frame's
    with torch.no_grad():
        full = net(x)
        shared = tiled_apply(net, x, tile=24, overlap=8, norm_root=net, norm=norm)
        per_tile = tiled_apply(net, x, tile=24, overlap=8, norm_root=net, norm="per-tile")
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    assert (per_tile - full).abs().max() > 0.1
    assert net.norm.forward.__func__ is nn.GroupNorm.forward  # the patch is gone afterwards


class ConvNet(nn.Module):
    """3x3 convolutions and GroupNorms in a chain, downsampling then upsampling: each GroupNorm's input
    depends on the statistics of the ones before it, which one gathering pass cannot get exactly."""

    def __init__(self):
        super().__init__()
        conv = lambda c_in, c_out, **kw: nn.Conv3d(c_in, c_out, (1, 3, 3), padding=(0, 1, 1), **kw)  # noqa: E731
        self.layers = nn.Sequential(
            conv(3, 16), nn.GroupNorm(4, 16), nn.SiLU(), conv(16, 16, stride=(1, 2, 2)), nn.GroupNorm(4, 16),
            nn.SiLU(), conv(16, 16), nn.GroupNorm(4, 16), nn.SiLU(), nn.Upsample(scale_factor=(1, 2, 2)),
            conv(16, 3))

    def forward(self, x):
        return self.layers(x)


def test_exact_statistics_reproduce_a_deep_network_where_a_first_pass_does_not():
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.randn(1, 3, 2, 64, 80)
    x[..., :32, :40] = x[..., :32, :40] * 3 + 2  # one quarter differs
    with torch.no_grad():
        full = net(x)
        exact = tiled_apply(net, x, tile=32, overlap=16, align=2, norm_root=net, norm="exact")
        first_pass = tiled_apply(net, x, tile=32, overlap=16, align=2, norm_root=net, norm="first-pass")
    torch.testing.assert_close(exact, full, atol=1e-4, rtol=1e-4)
    assert (first_pass - full).abs().max() > 1e-2


def test_norm_modes_are_checked():
    with pytest.raises(ValueError, match="tile norm must be one of exact, first-pass, per-tile"):
        TileSettings(norm="shared")


def test_deeper_levels_get_the_frames_tiling_scaled_down_but_not_below_a_floor():
    settings = TileSettings(tile=256, overlap=64)
    assert settings.level_tiles(1) == (256, 64)
    assert settings.level_tiles(2) == (128, 32)
    assert settings.level_tiles(8) == (64, 32)
    assert TileSettings(tile=48, overlap=16).level_tiles(1) == (48, 16)


def test_the_model_runs_each_level_through_local_map():
    """`local_map` gets each level's input and its scale: frames, then the encoder's downsampled
    features; the decoder's 1/8-resolution features, then each level's output before its upsample.
    The identity map changes nothing."""
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny").eval()
    video = torch.rand(1, 3, 8, 32, 48) * 2 - 1
    seen = []

    def identity(fn, x, scale):
        seen.append((x.shape[1], *x.shape[-2:], scale))
        return fn(x)

    with torch.no_grad():
        latent = model.encode(video).latent_dist.mode()
        torch.testing.assert_close(model.encode(video, local_map=identity).latent_dist.mode(), latent)
        torch.testing.assert_close(model.decode(latent, local_map=identity).sample, model.decode(latent).sample)
    widths = [model.cfg.base_channels * m for m in model.cfg.channel_multipliers]
    encoder = [(3, 32, 48, 1), (widths[0], 16, 24, 2), (widths[1], 8, 12, 4), (widths[2], 4, 6, 8)]
    decoder = [(widths[3], 4, 6, 8), (widths[3], 4, 6, 8), (widths[2], 8, 12, 4), (widths[1], 16, 24, 2)]
    assert seen == encoder + decoder


def test_pipeline_tiles_large_frames_and_keeps_their_size_and_output():
    """Random frames: exact statistics give the untiled output; per-tile statistics do not."""
    torch.manual_seed(0)
    model = with_temporal_layers(CrossModalVAE.from_preset("tiny"))
    frames = (torch.rand(4, 40, 144, 3) * 255).to(torch.uint8).numpy()  # tiles at 1/1 and 1/2 resolution
    run = lambda **s: VideoPipeline(model, PipelineSettings(device="cpu", dtype="float32", **s)).reconstruct_array(frames)  # noqa: E731
    untiled = run(tile=0)
    exact = run(tile=64, tile_overlap=32)
    per_tile = run(tile=64, tile_overlap=32, tile_norm="per-tile")
    assert exact.shape == per_tile.shape == untiled.shape == (4, 40, 144, 3)
    np.testing.assert_allclose(exact, untiled, atol=1e-4)
    assert np.abs(per_tile - untiled).max() > 1e-2


def test_exact_tiles_keep_the_cross_attention_patches_on_the_frames_grid():
    """With text, every level's cross-attention works on patches of 8 frame pixels; tiles that start
    off that grid would cut them differently from the whole frame."""
    torch.manual_seed(0)
    model = with_temporal_layers(CrossModalVAE.from_preset("tiny-text"))
    text = {"context": torch.randn(1, 5, model.cfg.context_dim), "context_mask": torch.ones(1, 5)}
    video = torch.rand(1, 3, 4, 40, 144) * 2 - 1  # tiles at 1/1 and 1/2 resolution
    local_map = VideoPipeline(model, PipelineSettings(device="cpu", dtype="float32", tile=64, tile_overlap=32))._tiler()
    with torch.no_grad():
        latent = model.encode(video, **text).latent_dist.mode()
        tiled_latent = model.encode(video, local_map=local_map, **text).latent_dist.mode()
        decoded, tiled_decoded = (model.decode(latent, local_map=m, **text).sample for m in (None, local_map))
    torch.testing.assert_close(tiled_latent, latent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tiled_decoded, decoded, atol=1e-4, rtol=1e-4)


def test_tiles_get_exact_statistics_unless_the_command_line_says_otherwise():
    from cmvae.cli import build_parser

    assert PipelineSettings().tile_norm == "exact"
    assert build_parser().parse_args(["reconstruct", "in.mp4"]).tile_norm == "exact"
    assert build_parser().parse_args(["reconstruct", "in.mp4", "--tile-norm", "per-tile"]).tile_norm == "per-tile"
