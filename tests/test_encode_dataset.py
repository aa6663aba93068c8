"""encode-dataset: shards, statistics, resuming after SIGKILL, splitting across torchrun ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cmvae import CrossModalVAE, save_model
from cmvae.video_io import write_video

from media import moving_pattern

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(CrossModalVAE.from_preset("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six short clips and two images, with captions in a CSV."""
    folder = tmp_path_factory.mktemp("data")
    rows = ["path,caption"]
    for i in range(6):
        write_video(folder / f"clip{i}.mp4", moving_pattern(4 + 2 * i, 16, 24, seed=i))
        rows.append(f"clip{i}.mp4,clip number {i}")
    for i in range(2):
        write_video(folder / f"still{i}.png", moving_pattern(1, 16, 16, seed=10 + i))
        rows.append(f"still{i}.png,a still image")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return folder / "list.csv"


def _command(dataset, out, model_folder, extra=()) -> list[str]:
    return ["encode-dataset", str(dataset), "-o", str(out), "--model", str(model_folder), "--shard-size", "2",
            "--tile", "0", *extra]


def _run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "cmvae.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _read_all(out: Path) -> dict[int, torch.Tensor]:
    """Every item's latent across shards; fails on duplicates."""
    latents: dict[int, torch.Tensor] = {}
    for shard in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            items = json.loads(handle.metadata()["items"])
            for item in items:
                assert item["index"] not in latents, f"item {item['index']} twice"
                latents[item["index"]] = handle.get_tensor(f"{item['index']:08d}.latent")
    return latents


def test_shards_and_statistics(dataset, model_folder, tmp_path):
    from cmvae.cli import main

    out = tmp_path / "latents"
    assert main(_command(dataset, out, model_folder, ["--store-logvar"])) == 0
    latents = _read_all(out)
    assert sorted(latents) == list(range(8))
    assert latents[0].shape == (16, 1, 2, 3) and latents[5].shape == (16, 4, 2, 3)  # 14 frames -> 16 -> 4
    assert latents[6].shape == (16, 1, 2, 2)  # an image: image mode
    with safe_open(str(next(out.glob("shard-*.safetensors"))), "pt") as handle:
        assert any(k.endswith(".logvar") for k in handle.keys())
        assert json.loads(handle.metadata()["items"])[0]["caption"].startswith("clip number")
    stats = json.loads((out / "latent_stats.json").read_text())
    values = torch.cat([z.flatten(1) for z in latents.values()], dim=1).double()
    assert torch.allclose(torch.tensor(stats["mean"], dtype=torch.float64), values.mean(1), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["std"], dtype=torch.float64), values.std(1, unbiased=False), atol=1e-5)
    assert stats["scaling_factor"] == pytest.approx(1 / values.std(unbiased=False).item(), rel=1e-5)


def test_killed_run_resumes_to_the_same_result(dataset, model_folder, tmp_path):
    reference = tmp_path / "reference"
    assert _run_cli(_command(dataset, reference, model_folder)).wait(timeout=600) == 0

    out = tmp_path / "resumed"
    process = _run_cli(_command(dataset, out, model_folder))
    deadline = time.time() + 600
    while not list(out.glob("shard-*.safetensors")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed; make the dataset larger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = _read_all(out)
    assert 0 < len(partial) < 8
    assert not (out / "latent_stats.json").exists()

    again = _run_cli(_command(dataset, out, model_folder))
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    assert f"already done {len(partial)}" in stdout
    resumed, expected = _read_all(out), _read_all(reference)
    assert sorted(resumed) == sorted(expected) == list(range(8))
    for index in expected:
        assert torch.equal(resumed[index], expected[index]), index
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert (out / "latent_stats.json").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_splits_items_between_ranks(dataset, model_folder, tmp_path):
    out = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "cmvae.cli", *_command(dataset, out, model_folder)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    by_rank: dict[str, set[int]] = {}
    for shard in out.glob("shard-*.safetensors"):
        rank = shard.name.split("-")[1]
        with safe_open(str(shard), "pt") as handle:
            by_rank.setdefault(rank, set()).update(i["index"] for i in json.loads(handle.metadata()["items"]))
    assert by_rank == {"r00": {0, 2, 4, 6}, "r01": {1, 3, 5, 7}}
    assert sorted(_read_all(out)) == list(range(8))
    assert (out / "latent_stats.json").is_file()
