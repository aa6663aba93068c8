"""Never lose a user's file: model folders, outputs that are inputs, dataset items that fail, signals.

Every test here runs the real command (in this process, or as a subprocess where a signal is sent)
on real files, and checks that what the user had is still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmvae import CrossModalVAE, load_model, save_model
from cmvae.video_io import read_video, write_video

from cli_run import assert_one_error_line, run
from media import moving_pattern

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def usual_mode(directory: bool = False) -> int:
    """What `open` or `mkdir` gives under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny() -> CrossModalVAE:
    torch.manual_seed(0)
    return CrossModalVAE.from_preset("tiny")


@pytest.fixture(scope="module")
def fast(tiny, tmp_path_factory) -> list[str]:
    """Options for a quick run: a small model (one, so that a rerun recognises its shards) and no tiles."""
    return ["--model", str(save_model(tiny, tmp_path_factory.mktemp("model") / "tiny")), "--tile", "0"]


@pytest.fixture(scope="module")
def weights_file(tiny, tmp_path_factory) -> Path:
    """A plain state dict, as `cmvae convert` takes."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint_file(tiny, tmp_path_factory) -> Path:
    """A training checkpoint in the format `cmvae train` writes, as `cmvae export` takes."""
    path = tmp_path_factory.mktemp("run") / "step-00000001.pt"
    torch.save({"model": tiny.state_dict(), "step": 1, "model_config": tiny.cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", moving_pattern(4, 32, 32))


def users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("two years of work")
    (path / "config.json").write_text('{"not": "a model"}')
    return path


# ---- model folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_folder_the_command_did_not_write_is_kept(command, weights_file, checkpoint_file, tmp_path, capsys):
    source = weights_file if command == "convert" else checkpoint_file
    folder = users_folder(tmp_path / "mine")
    before = {p.name: digest(p) for p in folder.iterdir()}
    code, _, err = run(capsys, command, source, "-o", folder)
    assert code == 1
    assert_one_error_line(err, command)
    assert "not a model folder written by cmvae" in err
    code, _, err = run(capsys, command, source, "-o", folder, "--overwrite")  # --overwrite does not change that
    assert code == 1 and "not a model folder written by cmvae" in err
    assert {p.name: digest(p) for p in folder.iterdir()} == before


def test_converting_into_the_current_folder_keeps_its_files(weights_file, tmp_path, capsys, monkeypatch):
    here = users_folder(tmp_path / "here")
    monkeypatch.chdir(here)
    before = {p.name: digest(p) for p in here.iterdir()}
    code, _, err = run(capsys, "convert", weights_file, "-o", ".")
    assert code == 1
    assert_one_error_line(err, "convert")
    assert {p.name: digest(p) for p in here.iterdir()} == before


@pytest.mark.parametrize("command", ["convert", "export"])
def test_overwrite_replaces_only_the_model_files_with_the_usual_permissions(command, tiny, weights_file,
                                                                            checkpoint_file, tmp_path, capsys):
    source = weights_file if command == "convert" else checkpoint_file
    folder = tmp_path / "model"
    assert run(capsys, command, source, "-o", folder)[0] == 0
    (folder / "README.md").write_text("my notes on this model")
    code, _, err = run(capsys, command, source, "-o", folder)  # without --overwrite: refused
    assert code == 1 and "--overwrite" in err
    assert run(capsys, command, source, "-o", folder, "--overwrite")[0] == 0
    assert (folder / "README.md").read_text() == "my notes on this model"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "autoencoder.py", "config.json",
                                                        "diffusion_pytorch_model.safetensors"]
    for name in ("autoencoder.py", "config.json", "diffusion_pytorch_model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == usual_mode(), name
    assert (folder.stat().st_mode & 0o777) == usual_mode(directory=True)
    reloaded = load_model(folder)
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_an_empty_folder_is_filled(weights_file, tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert run(capsys, "convert", weights_file, "-o", folder)[0] == 0
    assert (folder / "config.json").is_file() and hidden(folder) == [] and hidden(tmp_path) == []


# ---- an output that is the input ------------------------------------------------------------------


def test_an_output_that_is_the_input_is_refused(clip, weights_file, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    video = write_video(work / "v.mp4", read_video(clip))
    alias = work / "alias.safetensors"
    alias.symlink_to(video)  # the same file under another name
    (work / "pooled.csv").write_text("path\nv.mp4\n")  # a dataset list named like a report file
    weights_copy = work / "diffusion_pytorch_model.safetensors"
    weights_copy.write_bytes(weights_file.read_bytes())
    (work / "config.json").write_text(json.dumps({"_cmvae_files": ["config.json", weights_copy.name]}))
    inputs = {p: digest(p) for p in (video, weights_copy, work / "pooled.csv")}
    cases = [
        ("reconstruct", video, "-o", video),
        ("reconstruct", video, "-o", work / ".." / "work" / "v.mp4"),
        ("reconstruct", video, "-o", work / "v_reconstructed.mp4", "--side-by-side", "--model", "tiny"),
        ("encode", video, "-o", video),  # the case: the video overwritten by a latent file
        ("encode", video, "-o", alias),
        ("decode", alias, "-o", alias),
        ("encode-dataset", work, "-o", work),
        ("convert", weights_copy, "-o", work, "--overwrite"),
        ("eval", work, work, "-o", work),
        ("eval", work / "pooled.csv", "--model", "tiny", "-o", work),
    ]
    (work / "v_side_by_side.mp4").symlink_to(video)  # the side-by-side output would be the input
    for command, *args in cases:
        code, _, err = run(capsys, command, *args)
        assert code == 1, (command, args, err)
        assert_one_error_line(err, command)
        for path, before in inputs.items():
            assert digest(path) == before, (command, args, path)
    assert hidden(work) == []


def test_reconstructing_a_folder_into_its_subfolder_reads_only_the_inputs(fast, clip, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mp4", read_video(clip))
    code, _, err = run(capsys, "reconstruct", folder, "-o", folder)  # into itself: refused
    assert code == 1 and "is the input" in err
    for _ in range(2):  # a second run must not take the first run's outputs as inputs
        assert run(capsys, "reconstruct", folder, "-o", folder / "out", *fast)[0] == 0
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["a_reconstructed.mp4"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.mp4", "out"]


# ---- encode-dataset: failed items -----------------------------------------------------------------


def _dataset_items(out: Path) -> dict[int, str]:
    from safetensors import safe_open

    items = {}
    for shard in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for item in json.loads(handle.metadata()["items"]):
                assert item["index"] not in items, "an item in two shards"
                assert f"{item['index']:08d}.latent" in handle.keys(), "an item without its latent"
                items[item["index"]] = Path(item["path"]).name
    return items


def test_failed_dataset_items_fail_the_exit_and_are_retried(fast, clip, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / "good.mp4", read_video(clip))
    (data / "late.mp4").write_bytes(b"not a video yet")
    (data / "list.txt").write_text("good.mp4\nlate.mp4\n")
    out = tmp_path / "latents"
    command = ["encode-dataset", data / "list.txt", "-o", out, *fast]
    code, stdout, err = run(capsys, *command)
    assert code == 1
    assert "failed: " in err and "late.mp4" in err
    assert_one_error_line(err, "encode-dataset")
    assert _dataset_items(out) == {0: "good.mp4"}
    code, stdout, err = run(capsys, *command, "--allow-failures")
    assert code == 0 and "failed 1" in stdout
    write_video(data / "late.mp4", read_video(clip))  # the file is fixed: the next run encodes it
    code, stdout, err = run(capsys, *command)
    assert code == 0, err
    assert "encoded 1, already done 1, failed 0" in stdout
    assert _dataset_items(out) == {0: "good.mp4", 1: "late.mp4"}


def test_a_changed_dataset_list_is_refused(fast, clip, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.mp4", "b.mp4"):
        write_video(data / name, read_video(clip))
    out = tmp_path / "latents"
    (data / "list.txt").write_text("a.mp4\n")
    assert run(capsys, "encode-dataset", data / "list.txt", "-o", out, *fast)[0] == 0
    (data / "list.txt").write_text("b.mp4\na.mp4\n")  # item 0 is another file now
    code, _, err = run(capsys, "encode-dataset", data / "list.txt", "-o", out, *fast)
    assert code == 1 and "the list changed" in err
    assert_one_error_line(err, "encode-dataset")
    assert _dataset_items(out) == {0: "a.mp4"}


# ---- signals --------------------------------------------------------------------------------------


def _start_reconstruct(source: Path, target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "cmvae.cli", "reconstruct", str(source), "-o", str(target), "--model", "tiny",
               "--tile", "0"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temporary(process: subprocess.Popen, folder: Path) -> list[str]:
    deadline = time.time() + 120
    while not hidden(folder) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the command ended before its output was started; make the clip longer"
    return hidden(folder)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """Long enough that the reconstruction is still running when the signal arrives."""
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", moving_pattern(24, 64, 64))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c(stop, long_clip, tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"the user's earlier output")
    process = _start_reconstruct(long_clip, target)
    temporaries = _wait_for_temporary(process, tmp_path)
    assert all(str(process.pid) in name for name in temporaries), temporaries  # named with the process id
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + stop
    assert err.strip().splitlines()[-1] == f"cmvae reconstruct: stopped by {signal.Signals(stop).name}"
    assert "Traceback" not in err
    assert hidden(tmp_path) == []
    assert target.read_bytes() == b"the user's earlier output"


def test_the_temporary_of_a_killed_run_is_swept_by_the_next_run(long_clip, tmp_path, capsys):
    target = tmp_path / "out.mp4"
    process = _start_reconstruct(long_clip, target)
    left = _wait_for_temporary(process, tmp_path)
    process.kill()
    process.wait()
    assert hidden(tmp_path) == left  # SIGKILL cannot be handled: the temporary stays, for now
    # a temporary of a process that is still running is left alone
    alive = tmp_path / f".{target.name}.cmvae-{os.getpid()}-running.mp4"
    alive.write_bytes(b"")
    short = write_video(tmp_path / "short.mp4", moving_pattern(4, 16, 16))
    assert run(capsys, "reconstruct", short, "-o", target, "--model", "tiny", "--tile", "0")[0] == 0
    assert hidden(tmp_path) == [alive.name]
    assert len(read_video(target)) == 4
