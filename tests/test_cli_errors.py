"""Bad input in one clear line, never a traceback; what the commands used to accept silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmvae import CrossModalVAE, load_model, save_model
from cmvae.checkpoints import DEFAULT_MODEL_DIR
from cmvae.cli import main
from cmvae.video_io import probe, read_video, write_video

from cli_run import assert_one_error_line, run
from media import moving_pattern

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> list[str]:
    """Options for a quick run: a small model (one, so that its latents decode) and no tiles."""
    folder = save_model(CrossModalVAE.from_preset("tiny"), tmp_path_factory.mktemp("model") / "tiny")
    return ["--model", str(folder), "--tile", "0"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", moving_pattern(4, 32, 32))


@pytest.fixture(scope="module")
def latent(clip, fast, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latent") / "clip.safetensors"
    assert main(["encode", str(clip), "-o", str(path), *fast]) == 0
    return path


# ---- tracebacks instead of one line ---------------------------------------------------------------


@pytest.mark.parametrize("device", ["nonsense", "meta", "cuda:abc"])
def test_bad_device_names(fast, device, clip, tmp_path, capsys):
    code, _, err = run(capsys, "reconstruct", clip, "-o", tmp_path / "out.mp4", *fast, "--device", device)
    assert code == 1 and device in assert_one_error_line(err, "reconstruct")
    code, _, err = run(capsys, "eval", clip, "--model", "tiny", "-o", tmp_path / "report", "--device", device)
    assert code == 1 and device in assert_one_error_line(err, "eval")
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("option", [["--resize", "0x0"], ["--resize", "0"], ["--resize", "-8"], ["--resize", "4x"],
                                    ["--shard-size", "0"]])
def test_sizes_that_are_not_positive(fast, option, clip, tmp_path, capsys):
    command = "encode-dataset" if option[0] == "--shard-size" else "reconstruct"
    code, _, err = run(capsys, command, clip, "-o", tmp_path / "out.mp4", *fast, *option)
    assert code == 2 and option[1] in assert_one_error_line(err, command)
    assert list(tmp_path.iterdir()) == []


def _edited_latent(latent: Path, path: Path, drop=(), nan: bool = False, **changes) -> Path:
    """A copy of a latent file with metadata changed or dropped, or a NaN in the latent."""
    with safe_open(str(latent), "pt") as handle:
        meta, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    meta = {k: v for k, v in {**meta, **changes}.items() if k not in drop}
    if nan:
        tensors["latent"][0, 0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("damage, message", [
    (dict(drop=["fps"]), "no fps"),
    (dict(width="0"), "must be positive"),
    (dict(frames="many"), "not a number"),
    (dict(nan=True), "NaN"),
])
def test_damaged_latent_files(fast, damage, message, latent, tmp_path, capsys):
    damaged = _edited_latent(latent, tmp_path / "damaged.safetensors", **damage)
    code, _, err = run(capsys, "decode", damaged, "-o", tmp_path / "out.mp4", *fast)
    assert code == 1 and message in assert_one_error_line(err, "decode")
    assert not (tmp_path / "out.mp4").exists()


def test_a_model_folder_whose_config_has_a_wrong_type(clip, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": "16"}))
    code, _, err = run(capsys, "reconstruct", clip, "-o", tmp_path / "out.mp4", "--model", folder)
    line = assert_one_error_line(err, "reconstruct")
    assert code == 1 and "latent_channels must be an integer" in line and str(folder) in line


@pytest.mark.parametrize("rows, message", [
    ('{"path": "clip.mp4"}\n{"caption": "no path"}\n', "item 2 has no path"),
    ('["clip.mp4"]\n', "line 1: expected an object"),
    ('{"path": "clip.mp4"}\n\n42\n', "line 3: expected an object"),
    ('{"path": 7}\n', "item 1 has no path"),
    ('{"path": "clip.mp4"\n', "line 1: not JSON"),
])
def test_bad_jsonl_rows(fast, rows, message, clip, tmp_path, capsys):
    shutil.copy(clip, tmp_path / "clip.mp4")
    (tmp_path / "list.jsonl").write_text(rows)
    code, _, err = run(capsys, "encode-dataset", tmp_path / "list.jsonl", "-o", tmp_path / "out", *fast)
    assert code == 1 and message in assert_one_error_line(err, "encode-dataset")


def test_a_corrupt_shard_in_the_output_folder(fast, clip, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-r00-00000000.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "encode-dataset", clip.parent, "-o", out, *fast)
    line = assert_one_error_line(err, "encode-dataset")
    assert code == 1 and "shard-r00-00000000.safetensors is damaged" in line
    assert (out / "shard-r00-00000000.safetensors").read_bytes() == b"\x00" * 100  # never deleted


FULL_DISK = """
import json, resource, sys
from cmvae.cli import main
import torch  # imported before the limit, as a real run has it
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KiB fail with EFBIG, as on a full disk
print(json.dumps([main(command) for command in json.loads(sys.argv[1])]))
"""


def test_writing_onto_a_full_disk(fast, tmp_path):
    """`encode` and `reconstruct` meet a real EFBIG (RLIMIT_FSIZE): one line each, naming the output, not
    its hidden temporary file; the earlier output is kept and no temporary is left."""
    source = write_video(tmp_path / "clip.mp4", moving_pattern(8, 64, 64, seed=3))
    targets = {"encode": tmp_path / "out.safetensors", "reconstruct": tmp_path / "out.mp4"}
    for target in targets.values():
        target.write_bytes(b"kept")
    commands = [[command, str(source), "-o", str(target), *fast] for command, target in targets.items()]
    result = subprocess.run([sys.executable, "-c", FULL_DISK, json.dumps(commands)], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stdout) == [1, 1]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2, result.stderr
    for line, (command, target) in zip(errors, targets.items()):
        assert line.startswith(f"cmvae {command}: error: ") and "File too large" in line and str(target) in line
        assert f"/.{target.name}" not in line  # names the output, not its hidden temporary
        assert target.read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out.mp4", "out.safetensors"]


def _libtorch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when PyTorch loads")
def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before it starts: SIGINT handled by default and not blocked, as a shell leaves it. In the
    full suite the child once inherited a state in which no Ctrl-C reached it (it ran to the end, exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_while_starting(fast, clip, tmp_path):
    """SIGINT while PyTorch is being imported (the first seconds) ends in one line, exit 130."""
    command = [sys.executable, "-m", "cmvae.cli", "reconstruct", str(clip), "-o", str(tmp_path / "out.mp4"), *fast]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.time() + 60
    while not _libtorch_mapped(process.pid) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    # Code inside the imports may swallow a pending KeyboardInterrupt (C code that clears any error, as
    # PyObject_HasAttr does; seen on a loaded machine): press Ctrl-C again, as a user would, until it ends
    deadline = time.time() + 120
    while True:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            assert time.time() < deadline, "the command did not stop on Ctrl-C within two minutes"
    assert process.returncode == 130, err
    assert err.strip() == "cmvae reconstruct: interrupted"
    assert not (tmp_path / "out.mp4").exists()


def test_help_does_not_import_pytorch():
    check = ("import sys; from cmvae.cli import build_parser; build_parser().format_help(); "
             "print(sorted(m for m in ('torch', 'numpy', 'av', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_python_dash_m_cmvae_is_the_command_line_with_a_version():
    import cmvae

    env = subprocess_env()
    helped = subprocess.run([sys.executable, "-m", "cmvae", "--help"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0, helped.stderr
    for command in ("reconstruct", "encode-dataset", "eval", "compare", "train", "export", "demo"):
        assert command in helped.stdout
    version = subprocess.run([sys.executable, "-m", "cmvae", "--version"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"cmvae {cmvae.__version__}", version.stderr
    wrong = subprocess.run([sys.executable, "-m", "cmvae", "reconstrut"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def test_command_modules_do_not_import_the_top_level_parser():
    check = ("import sys; import cmvae.evaluation_command, cmvae.training.command; "
             "from cmvae.evaluation_command import main; main(['--help'])")
    result = subprocess.run([sys.executable, "-c", check], env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "eval" in result.stdout, result.stderr
    leaked = subprocess.run([sys.executable, "-c", "import sys, cmvae.evaluation_command, cmvae.training.command; "
                             "from cmvae.training.command import main; "
                             "print('cmvae.cli' in sys.modules)"], env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert leaked.stdout.strip() == "False", leaked.stderr


# ---- messages and silent acceptance ---------------------------------------------------------------


def test_the_readme_eval_example_runs_as_written(clip, tmp_path, capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    assert "cmvae eval ground_truth/ reconstructions/ " in readme
    for folder in ("ground_truth", "reconstructions"):
        (tmp_path / folder).mkdir()
        shutil.copy(clip, tmp_path / folder / "clip.mp4")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "eval", "ground_truth/", "reconstructions/")
    assert code == 0, err
    assert json.loads((tmp_path / "eval_report" / "report.json").read_text())["pooled"]["frames"] == 4


def test_docs_say_eval_is_part_of_the_command():
    assert "once the command is wired" not in (ROOT / "docs" / "evaluation.md").read_text()


def test_side_by_side_writes_the_reconstruction_and_a_separate_comparison(fast, clip, tmp_path, capsys):
    source = tmp_path / "clip.mp4"
    shutil.copy(clip, source)
    code, out, err = run(capsys, "reconstruct", source, "--side-by-side", *fast)
    assert code == 0, err
    reconstruction, pair = probe(tmp_path / "clip_reconstructed.mp4"), probe(tmp_path / "clip_side_by_side.mp4")
    assert (reconstruction.width, reconstruction.height) == (32, 32)  # scorable against the input
    assert (pair.width, pair.height) == (64, 32)
    assert len(read_video(tmp_path / "clip_side_by_side.mp4")) == len(read_video(tmp_path / "clip_reconstructed.mp4"))


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no shipped default model")
def test_load_model_takes_default_as_the_command_line_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named "default" here
    model = load_model("default")
    assert model.cfg.to_dict() == load_model(DEFAULT_MODEL_DIR).cfg.to_dict()


def test_offline_text_encoder_fails_fast(tmp_path):
    """No cache and a hub that cannot be reached: one clear error within seconds (it took ~25 s of retries)."""
    check = ("import time; start = time.time()\n"
             "from cmvae.text import TextEncoderUnavailable, flan_t5_large\n"
             "try:\n    flan_t5_large()\n"
             "except TextEncoderUnavailable as error:\n    print(round(time.time() - start, 1), error)\n")
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://hub.invalid")  # .invalid never resolves
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    seconds, _, message = result.stdout.partition(" ")
    assert result.returncode == 0 and message, result.stderr[-2000:]
    assert "Hugging Face cache" in message and "hub.invalid" in message
    assert float(seconds) < 15, f"took {seconds} s"


@pytest.mark.parametrize("name, message", [
    ("out.jpg", "the output is a video"),
    ("out.xyz", ".xyz files cannot be written"),
    ("out.webm", ".webm files cannot be written"),
    ("", "is empty"),
])
def test_output_names_are_checked(fast, name, message, clip, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "reconstruct", clip, "-o", name, *fast)
    line = assert_one_error_line(err, "reconstruct")
    assert code == 1 and message in line and (name in line if name else True)
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in clip.parent.iterdir()) == ["clip.mp4"]


def test_a_non_utf8_caption_beside_the_video(fast, clip, tmp_path, capsys):
    source = tmp_path / "clip.mp4"
    shutil.copy(clip, source)
    (tmp_path / "clip.txt").write_bytes("café".encode("latin-1"))
    assert run(capsys, "reconstruct", source, "-o", tmp_path / "out.mp4", *fast)[0] == 0  # the model takes no text
    code, _, err = run(capsys, "reconstruct", source, "-o", tmp_path / "text.mp4", "--model", "tiny-text", "--tile",
                       "0")
    line = assert_one_error_line(err, "reconstruct")
    assert code == 1 and "clip.txt is not UTF-8 text" in line
    assert not (tmp_path / "text.mp4").exists()
    # encode-dataset records captions for diffusion training, whatever the model: the file is named
    code, _, err = run(capsys, "encode-dataset", tmp_path, "-o", tmp_path / "latents", *fast)
    assert code == 1 and "clip.txt is not UTF-8 text" in assert_one_error_line(err, "encode-dataset")


def test_nan_latents_written_by_hand_are_refused_by_the_python_api_too(latent, tmp_path):
    from cmvae.pipeline import load_latent

    damaged = _edited_latent(latent, tmp_path / "nan.safetensors", nan=True)
    with pytest.raises(ValueError, match="NaN"):
        load_latent(damaged)
    assert torch.isfinite(load_latent(latent).latent).all()
