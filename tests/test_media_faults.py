"""Inputs that decode but not as declared: a damaged container, a rotated phone clip, a variable
frame rate. Each is said in a note, or kept in the output."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cmvae import CrossModalVAE, save_model
from cmvae.cli import main
from cmvae.video_io import read_video

from media import encode_file, moving_pattern


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> list[str]:
    """Options for a quick run: a small model (one, so that its latents decode) and no tiles."""
    folder = save_model(CrossModalVAE.from_preset("tiny"), tmp_path_factory.mktemp("model") / "tiny")
    return ["--model", str(folder), "--tile", "0"]


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: ")]


def test_a_damaged_container_is_reported(fast, tmp_path, capsys):
    """The issue's case: an mkv with some zeroed bytes decodes 12 of its 48 frames without an error."""
    good = encode_file(tmp_path / "good.mkv", moving_pattern(48, 32, 32), codec="libx264", pix_fmt="yuv420p",
                       options={"crf": "23"})
    data = bytearray(good.read_bytes())
    data[len(data) // 2: len(data) // 2 + 1000] = bytes(1000)
    damaged = tmp_path / "damaged.mkv"
    damaged.write_bytes(bytes(data))
    decoded = len(read_video(damaged))
    assert decoded < 40, "the damage no longer loses frames; damage the file elsewhere"
    code, err = run(capsys, "reconstruct", damaged, "-o", tmp_path / "out.mp4", *fast)
    assert code == 0
    assert any(f"only {decoded} of the about 48 frames" in note for note in notes(err)), err
    assert len(read_video(tmp_path / "out.mp4")) == decoded


def rotated_clip(path: Path, degrees: int) -> Path:
    """A clip with a display matrix, as a phone held upright writes it."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(degrees)
        for frame in moving_pattern(4, 16, 32):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def first_frame_rotation(path: Path) -> int:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).rotation


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write a display matrix")
def test_rotation_is_kept(fast, tmp_path, capsys):
    source = rotated_clip(tmp_path / "portrait.mp4", 90)
    assert first_frame_rotation(source) == 90
    out = tmp_path / "out.mp4"
    assert run(capsys, "reconstruct", source, "-o", out, *fast)[0] == 0
    assert first_frame_rotation(out) == 90
    assert read_video(out).shape == (4, 16, 32, 3)  # stored as the input is; players turn both alike
    # through a latent file too
    latent = tmp_path / "portrait.safetensors"
    assert run(capsys, "encode", source, "-o", latent, *fast)[0] == 0
    assert run(capsys, "decode", latent, "-o", tmp_path / "decoded.mp4", *fast)[0] == 0
    assert first_frame_rotation(tmp_path / "decoded.mp4") == 90


def test_variable_frame_rate_is_reported(fast, tmp_path, capsys):
    source = tmp_path / "vfr.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for index, frame in enumerate(moving_pattern(8, 16, 32)):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = pts, Fraction(1, 1000)
            pts += 40 if index % 2 == 0 else 120  # 40 and 120 ms apart in turn
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    code, err = run(capsys, "reconstruct", source, "-o", tmp_path / "out.mp4", *fast)
    assert code == 0
    assert any("40 to 120 ms apart" in note and "variable frame rate" in note for note in notes(err)), err
    assert len(read_video(tmp_path / "out.mp4")) == 8


def test_a_constant_frame_rate_gets_no_note(fast, tmp_path, capsys):
    source = encode_file(tmp_path / "cfr.mp4", moving_pattern(8, 16, 32), fps=Fraction(30000, 1001))
    code, err = run(capsys, "reconstruct", source, "-o", tmp_path / "out.mp4", *fast)
    assert code == 0 and notes(err) == [], err
    np.testing.assert_equal(len(read_video(tmp_path / "out.mp4")), 8)
