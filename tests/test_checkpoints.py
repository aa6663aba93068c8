"""Loading the authors' checkpoint format strictly and safely; saving and converting our own."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmvae import CrossModalVAE, preset
from cmvae.checkpoints import CheckpointError, load_model, read_state_dict, save_model
from cmvae.cli import main as cli_main

from test_reference import assert_matches_reference


@pytest.fixture(scope="module")
def authors_ckpt(reference_dir, tmp_path_factory):
    """A Lightning-style checkpoint built from the small text reference weights, with a `loss.` key."""
    state = load_file(reference_dir / "small_4z_text_weights.safetensors")
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    path = tmp_path_factory.mktemp("ckpt") / "small-4z-text.ckpt"
    torch.save({"state_dict": state, "global_step": 12, "epoch": 0, "pytorch-lightning_version": "1.9.0"}, path)
    return path


def _save_variant(path, reference_dir, change):
    state = load_file(reference_dir / "small_4z_text_weights.safetensors")
    change(state)
    torch.save({"state_dict": state}, path)
    return path


def test_authors_checkpoint_loads_and_reproduces_reference(authors_ckpt, reference_dir):
    model = load_model(authors_ckpt, config="small-4z-text")
    assert model.cfg == preset("small-4z-text")
    assert len(model.load_report.skipped_unused) > 0
    assert all(".conv3_tmp." in k for k in model.load_report.skipped_unused)
    assert_matches_reference(model, load_file(reference_dir / "small_4z_text_io.safetensors"))


KEY = "encoder.down.1.block.0.conv1.weight"


def test_removed_key_is_named(tmp_path, reference_dir):
    path = _save_variant(tmp_path / "removed.ckpt", reference_dir, lambda s: s.pop(KEY))
    with pytest.raises(CheckpointError, match=f"missing keys: {KEY}"):
        load_model(path, config="small-4z-text")


def test_renamed_key_is_named(tmp_path, reference_dir):
    path = _save_variant(tmp_path / "renamed.ckpt", reference_dir, lambda s: s.update({KEY + "_x": s.pop(KEY)}))
    with pytest.raises(CheckpointError) as error:
        load_model(path, config="small-4z-text")
    assert f"missing keys: {KEY}" in str(error.value) and f"unexpected keys: {KEY}_x" in str(error.value)


def test_misshaped_key_is_named(tmp_path, reference_dir):
    path = _save_variant(tmp_path / "misshaped.ckpt", reference_dir, lambda s: s.update({KEY: s[KEY][:, :, :, :2]}))
    with pytest.raises(CheckpointError, match=f"mis-shaped keys: {KEY}"):
        load_model(path, config="small-4z-text")


def test_wrong_config_names_the_mismatch(authors_ckpt):
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_model(authors_ckpt, config="small-16z-text")


class Payload:
    """Unpickling this would call `os.system`: a weights file must never be able to do that."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/cmvae-pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_state_dict(path)


Point = collections.namedtuple("Point", "x y")


def test_pickle_with_foreign_container_is_refused(tmp_path):
    path = tmp_path / "ordered.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "meta": Point(1, 2)}, path)
    with pytest.raises(CheckpointError, match="tensors and plain containers"):
        read_state_dict(path)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "note": "hello"}, path)
    with pytest.raises(CheckpointError, match="not tensors: note"):
        read_state_dict(path)


def test_garbage_and_missing_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.ckpt")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad_st)


def test_plain_state_dicts_load(tmp_path, reference_dir):
    state = load_file(reference_dir / "small_16z_weights.safetensors")
    torch.save(state, tmp_path / "plain.pth")
    save_file(state, tmp_path / "plain.safetensors")
    a = load_model(tmp_path / "plain.pth")
    b = load_model(tmp_path / "plain.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_save_pretrained_round_trip_is_exact(tmp_path, reference_dir):
    model = load_model(reference_dir / "small_4z_text_weights.safetensors", config="small-4z-text")
    folder = save_model(model, tmp_path / "model")
    assert (folder / "config.json").is_file()
    assert any(folder.glob("*.safetensors"))
    again = load_model(folder)
    assert again.cfg == model.cfg
    io = load_file(reference_dir / "small_4z_text_io.safetensors")
    text = {"context": io["context"], "context_mask": io["context_mask"]}
    with torch.no_grad():
        a = model.decode(model.encode(io["video"], **text).latent_dist.mode(), **text).sample
        b = again.decode(again.encode(io["video"], **text).latent_dist.mode(), **text).sample
    assert torch.equal(a, b)
    again_direct = CrossModalVAE.from_pretrained(folder)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again_direct.parameters()))


def test_config_given_for_a_model_folder_is_refused(tmp_path):
    folder = save_model(CrossModalVAE.from_preset("tiny"), tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="its own config.json"):
        load_model(folder, config="tiny")


def test_convert_command_writes_a_loadable_folder(authors_ckpt, tmp_path, reference_dir, capsys):
    out = tmp_path / "converted"
    assert cli_main(["convert", str(authors_ckpt), "-o", str(out), "--config", "small-4z-text"]) == 0
    assert "skipped" in capsys.readouterr().out
    model = load_model(out)
    assert_matches_reference(model, load_file(reference_dir / "small_4z_text_io.safetensors"))


def test_convert_command_reports_errors_without_traceback(tmp_path):
    garbage = tmp_path / "x.ckpt"
    garbage.write_bytes(b"junk")
    result = subprocess.run([sys.executable, "-m", "cmvae.cli", "convert", str(garbage), "-o", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr and "x.ckpt" in result.stderr
    assert not (tmp_path / "o").exists()
