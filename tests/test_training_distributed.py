"""Real torch.distributed runs under torchrun (2 CPU processes, gloo): DDP averages gradients and shards the
data; FSDP gives the same training as DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cmvae.training.checkpoint import latest_checkpoint, read_checkpoint
from cmvae.training.config import config_from_dict
from cmvae.training.trainer import Trainer
from media import encode_file, moving_pattern

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(base_channels=32, channel_multipliers=[1, 2], temporal_channels=32, num_res_blocks=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(clips: Path, output: Path, **changes) -> dict:
    """Three steps, the third of them on an image batch. SGD: Adam would turn the rounding differences of
    near-zero gradients (a batch of 2 sums in another order than two batches of 1) into steps of +-lr, and
    it is blind to the scale of the gradients, so only SGD can show the weights agree to 1e-5 because the
    gradients are averaged."""
    values = {
        "run": {"output": str(output), "steps": 3, "progress": False, "export_model": False, "log_every": 1,
                "precision": "float32", "memory_format": "contiguous",  # one numerical path on every CPU and strategy
                "trace_data": True, "checkpoint_every": 100},
        "model": {"preset": "tiny", "config": SMALL, "sample_posterior": False},
        "data": {"videos": [str(clips)], "frames": 4, "size": 32, "batch_size": 1, "workers": 0, "image_every": 3},
        "loss": {"lpips": 0.0},
        "optim": {"optimizer": "sgd", "lr": 2e-6, "ema_decay": 0.9},
    }
    for section, section_changes in changes.items():
        values.setdefault(section, {}).update(section_changes)
    return values


def torchrun(config: dict, tmp_path: Path, name: str, processes: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "cmvae.training.command", "train", str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return Path(config["run"]["output"])


def final_state(run_dir: Path) -> dict:
    return read_checkpoint(latest_checkpoint(run_dir))


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for k in range(4):
        encode_file(folder / f"clip{k}.mp4", moving_pattern(16, 40, 48, seed=k))
    return folder


@pytest.fixture(scope="module")
def ddp_run(clips, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    config = run_config(clips, tmp / "ddp", distributed={"strategy": "ddp"})
    return torchrun(config, tmp, "ddp"), config


def test_two_ddp_processes_equal_one_process_with_twice_the_batch(ddp_run, clips, tmp_path):
    ddp_dir, _ = ddp_run
    single_config = run_config(clips, tmp_path / "single", data={"batch_size": 2})
    trainer = Trainer(config_from_dict(single_config))
    trainer.run()
    trainer.close()
    ddp, single = final_state(ddp_dir), final_state(tmp_path / "single")
    assert ddp["step"] == single["step"] == 3 and ddp["world"] == 2
    assert_same_tensors(ddp["model"], single["model"], atol=1e-5)
    assert_same_tensors(ddp["ema"], single["ema"], atol=1e-5)
    fresh = Trainer(config_from_dict(run_config(clips, tmp_path / "fresh")))
    moved = max((ddp["model"][n] - p.detach()).abs().max().item() for n, p in fresh.model.named_parameters())
    fresh.close()
    assert moved > 5e-4  # the weights did move, 50 times the tolerance

    traces = [json.loads(line) for line in (ddp_dir / "data-trace.jsonl").read_text().splitlines()]
    single_traces = [json.loads(line) for line in (tmp_path / "single" / "data-trace.jsonl").read_text().splitlines()]
    assert [t["kind"] for t in single_traces] == ["video", "video", "image"]
    for batch, together in enumerate(single_traces):
        ranks = sorted((t for t in traces if t["batch"] == batch), key=lambda t: t["rank"])
        assert [t["rank"] for t in ranks] == [0, 1]
        assert ranks[0]["paths"] != ranks[1]["paths"]  # the ranks saw different clips
        assert ranks[0]["paths"] + ranks[1]["paths"] == together["paths"]  # which one process sees at once


def test_fsdp_matches_ddp(clips, tmp_path):
    """The paper's optimiser and losses this time: Adam, sampled posteriors, LPIPS (random backbone), and the
    GAN from the second step on, so the adaptive weight and the discriminators are compared too. Both runs
    compute the same per-rank batches, so only the reductions differ."""
    recipe = dict(model={"sample_posterior": True}, loss={"lpips": 1.0, "lpips_vgg_weights": "random", "disc_start": 1},
                  optim={"optimizer": "adam", "lr": 1e-4, "ema_decay": 0.9, "fused": False})  # FSDP's Adam
    ddp = run_config(clips, tmp_path / "ddp", distributed={"strategy": "ddp"}, **recipe)
    fsdp = run_config(clips, tmp_path / "fsdp", distributed={"strategy": "fsdp"}, **recipe)
    a = final_state(torchrun(ddp, tmp_path, "ddp"))
    # FSDP in two launches: 2 steps, then the run resumed from its checkpoint (sharded state restored) to 3
    fsdp["run"]["steps"] = 2
    assert final_state(torchrun(fsdp, tmp_path, "fsdp"))["step"] == 2
    fsdp["run"]["steps"] = 3
    b = final_state(torchrun(fsdp, tmp_path, "fsdp"))
    assert a["step"] == b["step"] == 3 and b["config"]["distributed"]["strategy"] == "fsdp"
    assert_same_tensors(a["model"], b["model"], atol=1e-5)
    assert_same_tensors(a["ema"], b["ema"], atol=1e-5)
    assert_same_tensors(a["discriminators"], b["discriminators"], atol=1e-5)
