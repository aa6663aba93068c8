"""The run configuration: YAML sections, dotted key=value overrides, typed values, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmvae.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_and_defaults(tmp_path):
    path = _write(tmp_path, "model: {preset: tiny}\ndata: {videos: [clips.csv], size: 64}\noptim: {lr: 3.0e-4}\n")
    config = load_config(path)
    assert config.model.preset == "tiny"
    assert config.size == (64, 64)
    assert config.optim.lr == 3e-4
    # the paper's recipe where the file is silent
    assert config.optim.betas == [0.5, 0.9]
    assert config.loss.kl == 1e-6 and config.loss.disc_weight == 0.5 and config.loss.lpips == 1.0
    assert config.data.frames == 16 and config.data.stride == 4 and config.data.image_every == 5


def test_dotted_overrides_take_yaml_values(tmp_path):
    path = _write(tmp_path, "model: {preset: tiny}\ndata: {videos: [a.csv]}\n")
    config = load_config(path, ["optim.lr=2e-4", "data.size=[48,64]", "model.trainable=[temporal]",
                                "loss.lpips=0", "optim.ema_decay=0.99", "run.output=elsewhere"])
    assert config.optim.lr == 2e-4 and isinstance(config.optim.lr, float)
    assert config.size == (48, 64)
    assert config.model.trainable == ["temporal"]
    assert config.loss.lpips == 0.0
    assert config.optim.ema_decay == 0.99
    assert config.run.output == "elsewhere"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(_write(tmp_path, "model: {preset: tiny}\ndata: {videos: [a.csv]}\n"), ["optim.lr=5e-5"])
    again = load_config(_write(tmp_path, config.to_yaml()))
    assert again == config


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", "unknown key optim.lrr"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("run.precision=float16", "run.precision must be one of auto, float32, bfloat16"),
    ("data.frames=10", "multiple of 4"),
    ("data.size=[30,30]", "multiples of 8"),
    ("optim.lr", "key=value"),
    ("model.init=inflate", "needs model.weights"),
    ("optim.ema_decay=1.5", "between 0 and 1"),
    ("data.stride=0", "data.stride must be a whole number of at least 1"),
    ("data.stride=[2,0]", "data.stride must be a whole number of at least 1"),
    ("data.stride=[]", "data.stride must be a whole number of at least 1"),
    ("run.memory_format=nhwc", "run.memory_format must be one of auto, channels_last, contiguous"),
])
def test_bad_values_name_the_key(tmp_path, override, words):
    path = _write(tmp_path, "model: {preset: tiny}\ndata: {videos: [a.csv]}\n")
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        load_config(path, [override])


def test_stride_may_be_a_list_to_draw_from(tmp_path):
    config = load_config(_write(tmp_path, "model: {preset: tiny}\ndata: {videos: [a.csv]}\n"), ["data.stride=[1,2,4]"])
    assert config.data.stride == [1, 2, 4]


def test_missing_file_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="data.videos is empty"):
        load_config(_write(tmp_path, "model: {preset: tiny}\n"))


@pytest.mark.parametrize("name", ["train-cpu-small.yaml", "train-16z-text-gpu.yaml"])
def test_example_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.data.videos


@pytest.mark.parametrize("native", ["0", "1"])
def test_precision_auto_follows_the_cpu_kind(monkeypatch, native):
    import torch

    from cmvae.device import resolve_precision

    monkeypatch.setenv("CMVAE_CPU_BF16", native)
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    if native == "1":
        assert (auto.dtype, auto.memory_format) == (torch.bfloat16, torch.channels_last_3d)
    else:
        assert (auto.dtype, auto.memory_format) == (torch.float32, torch.contiguous_format)
    assert resolve_precision("float32", cpu).memory_format == torch.contiguous_format
    assert resolve_precision("float32", cpu, "channels_last").memory_format == torch.channels_last_3d
    assert resolve_precision("bfloat16", torch.device("cuda"), "contiguous").memory_format == torch.contiguous_format
    assert "emulated" in resolve_precision("bfloat16", cpu).reason or native == "1"
    training = resolve_precision("auto", cpu, training=True)  # bfloat16 backward crashed on such a CPU
    assert (training.dtype, training.memory_format) == (torch.float32, torch.contiguous_format)
    assert resolve_precision("auto", torch.device("cuda"), training=True).dtype in (torch.bfloat16, torch.float16)


def test_precision_override_must_be_0_or_1(monkeypatch):
    from cmvae.device import resolve_precision

    monkeypatch.setenv("CMVAE_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="CMVAE_CPU_BF16"):
        resolve_precision("auto", "cpu")
