"""`cmvae compare` on small random-weight instances of diffusers video autoencoders and of ours."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo,
                       AutoencoderKLWan)

from cmvae.compare import Autoencoder, FrameRule, MemoryMeter, Usage, reconstruct, wrap_diffusers, wrap_ours
from cmvae.evaluation_command import main
from cmvae.models import CMVAEConfig, CrossModalVAE

from media import encode_file, moving_pattern, sample_clip

CPU = torch.device("cpu")


def small_wan() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def small_cogvideox() -> AutoencoderKLCogVideoX:
    return AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1,
                                  norm_num_groups=4)


def small_hunyuan() -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1,
                                     norm_num_groups=4)


def small_ltx() -> AutoencoderKLLTXVideo:
    widths = (8, 16, 16, 16)
    return AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=widths, decoder_block_out_channels=widths,
                                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                 patch_size=1, patch_size_t=1)


def small_image_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def small_ours() -> CrossModalVAE:
    cfg = CMVAEConfig(base_channels=8, channel_multipliers=(1, 2, 2, 2), temporal_channels=8, norm_num_groups=4,
                      num_res_blocks=1, latent_channels=4)
    return CrossModalVAE.from_cmvae_config(cfg).eval()


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    small_ours().save_pretrained(root / "ours")
    small_wan().save_pretrained(root / "wan")
    small_cogvideox().save_pretrained(root / "cog")
    clips = root / "clips"
    clips.mkdir()
    sample_clip("bikes", 6, clips / "bikes.mp4", crop=(32, 48))
    encode_file(clips / "pattern.mkv", moving_pattern(5, 36, 44), codec="ffv1", pix_fmt="bgr0")  # 36x44: padded
    return root


def test_frame_rules_by_hand():
    assert FrameRule(4).fit(10) == 12 and FrameRule(4).fit(8) == 8 and FrameRule(4).describe() == "multiple of 4"
    assert FrameRule(4, True).fit(10) == 13 and FrameRule(4, True).fit(1) == 1 and FrameRule(4, True).fit(5) == 5
    assert FrameRule(8, True).fit(10) == 17 and FrameRule(8, True).describe() == "8k+1"
    assert FrameRule(1).fit(7) == 7


def test_compare_writes_table_and_plot(setup, capsys):
    out = setup / "report"
    code = main(["compare", str(setup / "clips"), "--model", f"ours={setup / 'ours'}", "--model", str(setup / "wan"),
                 "--model", str(setup / "cog"), "-o", str(out), "--device", "cpu", "--chunk-frames", "4",
                 "--lpips-random-backbone", "--warmup", "0"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    with (out / "compare.csv").open(newline="") as handle:
        rows = {r["model"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["ours", "wan", "cog"]
    assert [rows[m]["class"] for m in rows] == ["CrossModalVAE", "AutoencoderKLWan", "AutoencoderKLCogVideoX"]
    assert [rows[m]["frame_rule"] for m in rows] == ["multiple of 4", "4k+1", "8k+1"]
    # bikes (6 frames) and pattern (5): ours 8 + 8, Wan 9 + 5, CogVideoX 9 + 9
    assert [int(rows[m]["padded_frames"]) for m in rows] == [2 + 3, 3 + 0, 3 + 4]
    assert all(int(rows[m]["frames"]) == 11 for m in rows)
    for row in rows.values():
        assert float(row["encode_seconds"]) > 0 and float(row["decode_seconds"]) > 0
        assert float(row["encode_peak_mib"]) > 0 and float(row["decode_peak_mib"]) > 0
        assert 0 < float(row["pooled_psnr"]) < 30 and float(row["pooled_lpips"]) > 0
    # our model in chunks of 4: a cut before frame 4; the diffusers models are not chunked here
    assert rows["ours"]["pooled_boundary_psnr"] != "" and rows["wan"]["pooled_boundary_psnr"] == ""

    report = json.loads((out / "compare.json").read_text())
    assert "VmHWM" in report["memory"] and "RANDOM" in report["lpips"]
    assert report["clips"] == ["bikes", "pattern"]
    markdown = (out / "compare.md").read_text()
    assert "| model | class | frame rule |" in markdown and "8k+1" in markdown and "encode ms/frame" in markdown
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wan (AutoencoderKLWan, frames 4k+1)" in stdout

    # Wan on bikes, recomputed here with diffusers directly: last frame repeated to 9, trimmed back, rounded
    wan = AutoencoderKLWan.from_pretrained(setup / "wan").eval()
    frames = decode_rgb(setup / "clips" / "bikes.mp4")
    x = torch.from_numpy(np.concatenate([frames, np.repeat(frames[-1:], 3, axis=0)])).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        y = wan.decode(wan.encode(x.float() / 127.5 - 1).latent_dist.mode()).sample[0, :, :6]
    recon = np.round(np.clip((y.permute(1, 2, 3, 0).numpy() + 1) / 2, 0, 1) * np.float32(255))
    expected = np.mean([10 * np.log10(255.0**2 / np.mean((frames[t] - recon[t]) ** 2)) for t in range(6)])
    wan_result = next(m for m in report["models"] if m["model"] == "wan")
    assert wan_result["per_video"]["bikes"]["psnr"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("make, padded", [(small_hunyuan, 3), (small_ltx, 3), (small_image_vae, 0)])
def test_each_class_returns_the_frames_it_was_given(make, padded):
    torch.manual_seed(0)
    autoencoder = wrap_diffusers(make().eval(), "m", "memory")
    frames = moving_pattern(6, 32, 40)  # Hunyuan 4k+1 -> 9, LTX (8x in time) 8k+1 -> 9, image VAE any
    usage = Usage()
    output = reconstruct(autoencoder, frames, None, CPU, torch.float32, usage)
    assert output.shape == (6, 32, 40, 3) and output.dtype == np.float32
    assert usage.padded_frames == padded and usage.frames == 6


def test_captions_reach_a_text_model_in_every_chunk():
    seen = []

    class Encoder:  # records what the model asks to embed
        dim = 16

        def __call__(self, captions):
            seen.append(list(captions))
            return torch.ones(len(captions), 3, 16), torch.ones(len(captions), 3)

    cfg = CMVAEConfig(base_channels=8, channel_multipliers=(1, 2, 2, 2), temporal_channels=8, norm_num_groups=4,
                      num_res_blocks=1, latent_channels=4, context_dim=16, cross_attention_heads=2,
                      cross_attention_head_dim=8)
    model = CrossModalVAE.from_cmvae_config(cfg).eval()
    model.set_text_encoder(Encoder())
    autoencoder = wrap_ours(model, "text", "memory", chunk_frames=4)
    assert autoencoder.uses_captions
    output = reconstruct(autoencoder, moving_pattern(8, 16, 16), "a red car", CPU, torch.float32)
    assert output.shape == (8, 16, 16, 3)
    assert seen == [["a red car"]] * 4  # two chunks, encoded and decoded


def test_a_wrong_frame_rule_is_caught():
    cog = wrap_diffusers(small_cogvideox().eval(), "cog", "memory")
    wrong = Autoencoder("cog", cog.kind, cog.source, cog.module, FrameRule(4, True), cog.spatial_multiple,
                        cog.encode, cog.decode)
    with pytest.raises(ValueError, match="frame rule is not 4k\\+1"):
        reconstruct(wrong, moving_pattern(5, 16, 16), None, CPU, torch.float32)  # CogVideoX returns 8 frames


def test_memory_meter_sees_an_allocation_and_resets():
    meter = MemoryMeter(CPU)
    if "VmHWM" not in meter.method:
        pytest.skip("this system cannot reset the peak resident set size")
    meter.start()
    big = np.ones(80 * 2**20, dtype=np.uint8)  # 80 MiB, touched
    big_peak, big_rise = meter.stop()
    del big
    meter.start()
    small = np.ones(2**20, dtype=np.uint8)
    small_peak, small_rise = meter.stop()
    del small
    assert big_rise >= 75 * 2**20
    assert small_rise < 40 * 2**20 and small_peak < big_peak


def test_bad_models_fail_with_one_line(setup, tmp_path, capsys):
    clips = str(setup / "clips")
    assert main(["compare", clips, "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "r")]) == 1
    assert "no model at" in capsys.readouterr().err
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    assert main(["compare", clips, "--model", str(tmp_path / "unet"), "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "UNet2DModel" in err and "AutoencoderKLWan" in err and err.count("\n") == 1
    assert main(["compare", clips, "--model", f"a={setup / 'wan'}", "--model", f"a={setup / 'cog'}",
                 "-o", str(tmp_path / "r")]) == 1
    assert "share a name" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
