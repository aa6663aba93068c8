"""Video and image I/O on PyAV: formats, conversions, atomic writes, errors."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from cmvae.video_io import EncodeSettings, MediaError, VideoWriter, iter_chunks, probe, read_video, write_video

from media import audio_only_file, encode_file, moving_pattern


def test_lossless_round_trip_is_exact_at_odd_size(tmp_path):
    frames = moving_pattern(17, 37, 53)
    path = write_video(tmp_path / "odd.mp4", frames, fps=Fraction(30000, 1001), settings=EncodeSettings(lossless=True))
    info = probe(path)
    assert (info.width, info.height, info.fps) == (53, 37, Fraction(30000, 1001))
    assert np.array_equal(read_video(path), frames)


def test_default_h264_keeps_size_and_is_close(tmp_path):
    frames = moving_pattern(9, 37, 53)
    path = write_video(tmp_path / "odd.mp4", frames, fps=Fraction(25))
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 6
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def test_chunks_cover_every_frame_in_order(tmp_path):
    frames = moving_pattern(10, 16, 16)
    path = encode_file(tmp_path / "a.mkv", frames, codec="ffv1", pix_fmt="bgr0")
    chunks = list(iter_chunks(path, 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert np.array_equal(np.concatenate(chunks), frames)


@pytest.mark.parametrize("suffix, codec, pix_fmt", [
    (".webm", "libvpx-vp9", "yuv420p"),
    (".avi", "mjpeg", "yuvj420p"),
    (".gif", "gif", "rgb8"),
])
def test_other_containers_decode(tmp_path, suffix, codec, pix_fmt):
    frames = moving_pattern(6, 32, 48)
    path = encode_file(tmp_path / f"clip{suffix}", frames, codec=codec, pix_fmt=pix_fmt, options={})
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8


def test_grayscale_alpha_and_high_bit_depth_become_rgb_with_notes(tmp_path):
    gray = moving_pattern(4, 16, 16)[..., 0]
    gray_path = encode_file(tmp_path / "gray.mkv", np.ascontiguousarray(gray), codec="ffv1", pix_fmt="gray",
                            in_format="gray")
    assert read_video(gray_path).shape == (4, 16, 16, 3)
    assert any("grayscale" in n for n in probe(gray_path).notes)

    rgba = np.concatenate([moving_pattern(1, 16, 16), np.full((1, 16, 16, 1), 128, np.uint8)], axis=-1)
    rgba_path = encode_file(tmp_path / "alpha.png", rgba, codec="png", pix_fmt="rgba", in_format="rgba")
    assert read_video(rgba_path).shape == (1, 16, 16, 3)
    assert any("alpha" in n for n in probe(rgba_path).notes)

    deep = (moving_pattern(2, 16, 16).astype(np.uint16) * 257)
    deep_path = encode_file(tmp_path / "deep.mkv", deep, codec="ffv1", pix_fmt="rgb48le", in_format="rgb48le")
    back = read_video(deep_path)
    assert back.dtype == np.uint8 and np.abs(back.astype(int) - moving_pattern(2, 16, 16)).max() <= 1
    assert any("bit depth" in n for n in probe(deep_path).notes)


def test_image_write_and_probe(tmp_path):
    frame = moving_pattern(1, 9, 7)
    path = write_video(tmp_path / "x.png", frame)
    info = probe(path)
    assert info.is_image and info.frame_count == 1 and (info.width, info.height) == (7, 9)
    assert np.array_equal(read_video(path)[0], frame[0])


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "out.mp4") as writer:
            writer.write(moving_pattern(4, 16, 16))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        probe(tmp_path / "absent.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(MediaError, match="not a video"):
        probe(text)
    with pytest.raises(MediaError, match="no video stream"):
        probe(audio_only_file(tmp_path / "sound.m4a"))
    good = encode_file(tmp_path / "good.mp4", moving_pattern(30, 64, 64), codec="libx264", pix_fmt="yuv420p",
                       options={"crf": "20"})
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(MediaError):
        read_video(truncated)
    with pytest.raises(MediaError, match="does not exist"):
        with VideoWriter(tmp_path / "missing" / "out.mp4"):
            pass
