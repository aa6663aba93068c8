"""Whole videos through the pipeline and the command line: sizes, lengths, frame rates, bad input."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from cmvae import CrossModalVAE, save_model
from cmvae.cli import main as cli_main
from cmvae.pipeline import PipelineSettings, VideoPipeline, load_latent
from cmvae.video_io import probe, read_video, write_video

from media import audio_only_file, encode_file, moving_pattern, sample_clip

FAST = dict(tile=0, chunk_frames=8)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(CrossModalVAE.from_preset("tiny"), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folder):
    from cmvae.checkpoints import load_model

    return VideoPipeline(load_model(tiny_folder), PipelineSettings(**FAST))


@pytest.mark.parametrize("frames, height, width", [(17, 37, 53), (4, 8, 8), (5, 1, 1), (9, 16, 24)])
def test_arrays_come_back_at_their_size_and_length(tiny_pipe, frames, height, width):
    video = moving_pattern(frames, height, width)
    out = tiny_pipe.reconstruct_array(video)
    assert out.shape == video.shape and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_real_clip_odd_size_keeps_size_length_and_rate(tiny_folder, tmp_path):
    clip = sample_clip("bikes", 17, tmp_path / "bikes.mp4", crop=(37, 53))
    with av.open(str(clip), "r") as container:
        fps = container.streams.video[0].average_rate
    out = tmp_path / "out.mp4"
    assert cli_main(["reconstruct", str(clip), "-o", str(out), "--model", str(tiny_folder), "--chunk-frames", "8",
                     "--chunk-overlap", "4", "--tile", "0"]) == 0
    info = probe(out)
    assert (info.width, info.height, info.fps) == (53, 37, fps)
    assert len(read_video(out)) == 17


def test_generated_clip_non_integer_rate(tiny_folder, tmp_path):
    clip = write_video(tmp_path / "gen.mkv", moving_pattern(13, 24, 40), fps=Fraction(30000, 1001))
    out = tmp_path / "gen_out.mp4"
    assert cli_main(["reconstruct", str(clip), "-o", str(out), "--model", str(tiny_folder), "--tile", "0",
                     "--side-by-side"]) == 0
    info, pair = probe(out), probe(tmp_path / "gen_out_side_by_side.mp4")  # --side-by-side: a second file
    assert (info.width, info.height, info.fps) == (40, 24, Fraction(30000, 1001))
    assert (pair.width, pair.height, pair.fps) == (80, 24, Fraction(30000, 1001))
    assert len(read_video(out)) == len(read_video(pair.path)) == 13


def test_single_image_runs_in_image_mode(tiny_folder, tmp_path):
    image = write_video(tmp_path / "photo.png", moving_pattern(1, 29, 31))
    assert cli_main(["reconstruct", str(image), "--model", str(tiny_folder)]) == 0
    out = tmp_path / "photo_reconstructed.png"
    info = probe(out)
    assert info.is_image and (info.width, info.height) == (31, 29)


def test_folder_of_media(tiny_folder, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "a.mp4", moving_pattern(6, 16, 16))
    write_video(folder / "b.png", moving_pattern(1, 16, 16))
    assert cli_main(["reconstruct", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_folder)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_reconstructed.mp4", "b_reconstructed.png"]


def test_encode_decode_files_restore_size_and_length(tiny_folder, tmp_path):
    clip = write_video(tmp_path / "c.mp4", moving_pattern(10, 20, 28), fps=Fraction(12))
    latent = tmp_path / "c.safetensors"
    assert cli_main(["encode", str(clip), "-o", str(latent), "--model", str(tiny_folder), "--caption", "hi"]) == 0
    encoded = load_latent(latent)
    assert encoded.latent.shape == (1, 16, 3, 3, 4)
    assert (encoded.frames, encoded.width, encoded.height, encoded.fps) == (10, 28, 20, Fraction(12))
    out = tmp_path / "c_decoded.mp4"
    assert cli_main(["decode", str(latent), "-o", str(out), "--model", str(tiny_folder)]) == 0
    info = probe(out)
    assert (info.width, info.height, info.fps, len(read_video(out))) == (28, 20, Fraction(12), 10)


def test_decode_refuses_another_models_latent(tiny_folder, tmp_path, capsys):
    clip = write_video(tmp_path / "c.mp4", moving_pattern(4, 16, 16))
    latent = tmp_path / "c.safetensors"
    assert cli_main(["encode", str(clip), "-o", str(latent), "--model", str(tiny_folder)]) == 0
    torch.manual_seed(1)  # a model of the same shape with other weights
    other = save_model(CrossModalVAE.from_preset("tiny"), tmp_path / "other")
    out = tmp_path / "x.mp4"
    assert cli_main(["decode", str(latent), "-o", str(out), "--model", str(other)]) == 1
    assert "different model" in capsys.readouterr().err
    assert not out.exists()


def test_chunk_boundaries(tiny_pipe):
    pipe = VideoPipeline(tiny_pipe.model, PipelineSettings(chunk_frames=16, chunk_overlap=8, tile=0))
    assert pipe.chunk_boundaries(40) == [8, 16, 24]
    assert VideoPipeline(tiny_pipe.model, PipelineSettings(chunk_frames=8, chunk_overlap=0)).chunk_boundaries(17) \
        == [8, 16]


def test_chunks_overlap_by_four_frames_unless_they_are_too_short():
    assert PipelineSettings().chunking.overlap == 4
    assert PipelineSettings(chunk_frames=8).chunking.overlap == 4
    assert PipelineSettings(chunk_frames=4).chunking.overlap == 0
    assert PipelineSettings(chunk_overlap=0).chunking.overlap == 0


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("plain text, not a video")
    good = encode_file(tmp_path / "good.mp4", moving_pattern(40, 64, 64), codec="libx264", pix_fmt="yuv420p",
                       options={"crf": "23"})
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.mp4"
    data = bytearray(good.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4000] = bytes(4000)
    corrupt.write_bytes(bytes(data))
    empty = tmp_path / "empty.mkv"
    container = av.open(str(empty), "w")
    stream = container.add_stream("ffv1", rate=25)
    stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
    container.start_encoding()  # writes the header of a stream that never gets a frame
    container.close()
    assert empty.is_file()
    return {
        "missing": (tmp_path / "absent.mp4", "no such file"),
        "not a video": (text, "not a video"),
        "truncated": (truncated, "mp4"),
        "zero frames": (empty, "before any frame"),
        "audio only": (audio_only_file(tmp_path / "sound.m4a"), "no video stream"),
    }


def test_bad_inputs_fail_in_one_line_without_output(tiny_folder, tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    for name, (path, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}.mp4"
        code = cli_main(["reconstruct", str(path), "-o", str(out), "--model", str(tiny_folder)])
        err = capsys.readouterr().err.strip()
        assert code == 1, name
        assert message in err and len(err.splitlines()) == 1, (name, err)
        assert not out.exists(), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_corrupt_middle_fails_cleanly_or_recovers(tiny_folder, tmp_path, capsys):
    """A file damaged in the middle either decodes (FFmpeg conceals errors) or fails in one line."""
    good = encode_file(tmp_path / "good.mp4", moving_pattern(40, 64, 64), codec="libx264", pix_fmt="yuv420p",
                       options={"crf": "23"})
    data = bytearray(good.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4000] = bytes(4000)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    code = cli_main(["reconstruct", str(corrupt), "-o", str(out), "--model", str(tiny_folder), "--chunk-frames", "8"])
    err = capsys.readouterr().err.strip()
    if code == 0:
        assert len(read_video(out)) >= 1
    else:
        assert code == 1 and len(err.splitlines()) == 1 and not out.exists()


def test_unknown_model_and_unwritable_output(tiny_folder, tmp_path, capsys):
    clip = write_video(tmp_path / "c.mp4", moving_pattern(4, 16, 16))
    assert cli_main(["reconstruct", str(clip), "--model", str(tmp_path / "no-such-model")]) == 1
    assert "no model at" in capsys.readouterr().err
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert cli_main(["reconstruct", str(clip), "-o", str(blocker / "out.mp4"), "--model", str(tiny_folder)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["encode", str(clip), "-o", str(blocker / "c.safetensors"), "--model", str(tiny_folder)]) == 1
    assert "does not exist" in capsys.readouterr().err
