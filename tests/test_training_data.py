"""Training data on real files through PyAV: lists, clip sampling, crops, skipping, the batch plan, workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmvae.training.data import (IMAGE, VIDEO, BatchPlan, MediaItem, SampleSettings, SkipSample, TrainingBatches,
                                 clip_indices, load_clip, make_loader, read_sources)
from cmvae.video_io import write_video

from media import encode_file, moving_pattern


def numbered_video(path: Path, frames: int, height: int = 24, width: int = 40) -> Path:
    """Frame i is the flat grey level 3*i (exact: lossless RGB), so a decoded frame tells its number."""
    levels = (np.arange(frames, dtype=np.uint8) * 3)[:, None, None, None]
    return encode_file(path, np.ascontiguousarray(np.broadcast_to(levels, (frames, height, width, 3))))


def frame_numbers(clip: np.ndarray | torch.Tensor) -> list[int]:
    """Frame numbers of a (T, H, W, 3) uint8 clip of a numbered video."""
    clip = np.asarray(clip)
    assert (clip == clip[:, :1, :1, :1]).all(), "a numbered frame must stay flat"
    return [int(v) // 3 for v in clip[:, 0, 0, 0]]


# ---- lists ----------------------------------------------------------------------------------


def test_csv_jsonl_folder_and_txt_sources(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        numbered_video(videos / f"{name}.mp4", 8)
    (videos / "a.txt").write_text("a red kite\n")
    (videos / "notes.md").write_text("not a video")

    folder = read_sources([str(videos)], VIDEO)
    assert [(Path(i.path).name, i.caption) for i in folder] == [("a.mp4", "a red kite"), ("b.mp4", "")]

    (tmp_path / "list.csv").write_text('path,caption\nvideos/a.mp4,"first, with a comma"\nvideos/b.mp4,second\n')
    rows = read_sources([str(tmp_path / "list.csv")], VIDEO)
    assert rows == [MediaItem(str(videos / "a.mp4"), "first, with a comma"), MediaItem(str(videos / "b.mp4"), "second")]

    (tmp_path / "list.jsonl").write_text(json.dumps({"video": "a.mp4", "text": "x"}) + "\n\n")
    rows = read_sources([str(tmp_path / "list.jsonl")], VIDEO, root=str(videos), path_column="video",
                        caption_column="text")
    assert rows == [MediaItem(str(videos / "a.mp4"), "x")]

    (tmp_path / "list.txt").write_text("# comment\nvideos/a.mp4\n")
    assert read_sources([str(tmp_path / "list.txt")], VIDEO) == [MediaItem(str(videos / "a.mp4"), "a red kite")]


def test_webvid_layout(tmp_path):
    (tmp_path / "results_2M_train.csv").write_text("videoid,contentUrl,duration,page_dir,name\n"
                                                   "1066,http://x,PT00H00M10S,013_001,Aerial shot of a bay\n")
    (item,) = read_sources([str(tmp_path / "results_2M_train.csv")], VIDEO, root="/data/webvid")
    assert item == MediaItem("/data/webvid/013_001/1066.mp4", "Aerial shot of a bay")


def test_bad_lists_are_named(tmp_path):
    (tmp_path / "list.csv").write_text("file,caption\nx.mp4,y\n")
    with pytest.raises(ValueError, match=r"list.csv:2: no 'path' column"):
        read_sources([str(tmp_path / "list.csv")], VIDEO)
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4"}\nnot json\n')
    with pytest.raises(ValueError, match=r"list.jsonl:2: not a JSON object"):
        read_sources([str(tmp_path / "list.jsonl")], VIDEO)
    with pytest.raises(ValueError, match="data source not found"):
        read_sources([str(tmp_path / "missing.csv")], VIDEO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        read_sources([str(tmp_path / "empty")], VIDEO)


# ---- clips ----------------------------------------------------------------------------------


def test_clip_indices_stride_then_consecutive_then_too_short():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(50):
        indices = clip_indices(100, 16, 4, rng)
        assert np.diff(indices).tolist() == [4] * 15 and 0 <= indices[0] and indices[-1] < 100
        starts.add(indices[0])
    assert len(starts) > 10  # random positions
    assert clip_indices(100, 16, 4, None) == list(range(19, 80, 4))  # centred
    assert np.diff(clip_indices(40, 16, 4, rng)).tolist() == [1] * 15  # 40 < 61: consecutive frames
    with pytest.raises(SkipSample, match="too short: 10 frames"):
        clip_indices(10, 16, 4, rng)


def test_decoded_clip_takes_every_stride_th_frame_and_crops(tmp_path):
    path = numbered_video(tmp_path / "n.mp4", 64, height=24, width=40)
    clip = load_clip(MediaItem(str(path)), 8, 4, (16, 16), np.random.default_rng(3))
    assert clip.shape == (8, 16, 16, 3)
    numbers = frame_numbers(clip)
    assert np.diff(numbers).tolist() == [4] * 7
    short = numbered_video(tmp_path / "short.mp4", 12)
    assert np.diff(frame_numbers(load_clip(MediaItem(str(short)), 8, 4, (16, 16), None))).tolist() == [1] * 7


def test_resize_covers_then_crops(tmp_path):
    frames = np.zeros((4, 32, 64, 3), np.uint8)
    frames[:, :, 32:] = 255  # left half black, right half white
    path = encode_file(tmp_path / "halves.mp4", frames)
    clip = load_clip(MediaItem(str(path)), 4, 1, (16, 16), None)  # 32x64 -> 16x32, centred 16x16 crop
    assert clip.shape == (4, 16, 16, 3)
    assert clip[:, :, :6].max() < 30 and clip[:, :, -6:].min() > 225


def test_a_list_of_strides_is_drawn_from_per_clip(tmp_path):
    path = numbered_video(tmp_path / "n.mp4", 64)
    plan = BatchPlan(1, 1, 1, 1, 0, seed=0)
    dataset = TrainingBatches(plan, [MediaItem(str(path))], [], SampleSettings(4, [1, 3], (16, 16)))
    steps = set()
    for index in range(16):
        clip = dataset[plan.spec(index)]["pixels"][0].permute(1, 2, 3, 0)
        steps.update(np.diff(frame_numbers(clip)).tolist())
    assert steps == {1, 3}


# ---- batches ----------------------------------------------------------------------------------


def test_plan_schedules_one_image_batch_in_five_and_shards_ranks():
    single = BatchPlan(num_videos=10, num_images=7, batch_size=4, image_batch_size=6, image_every=5)
    kinds = [single.kind(i) for i in range(10)]
    assert kinds == [VIDEO] * 4 + [IMAGE] + [VIDEO] * 4 + [IMAGE]
    ranks = [BatchPlan(10, 7, 2, 3, 5, world=2, rank=r) for r in (0, 1)]
    for index in range(12):
        together = single.spec(index).positions
        apart = [p for plan in ranks for p in plan.spec(index).positions]
        assert apart == list(together)  # rank 0 and rank 1 split what one process with twice the batch takes
        assert not set(ranks[0].spec(index).positions) & set(ranks[1].spec(index).positions)
    # each epoch visits every video once, in a new order
    first = [single.sample(VIDEO, p) for p in range(10)]
    second = [single.sample(VIDEO, p) for p in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def _dataset(items, images=(), batch=2, image_every=0, seed=0, dropout=0.0, frames=4, size=(16, 16)):
    plan = BatchPlan(len(items), len(images or items), batch, batch, image_every, seed=seed)
    return TrainingBatches(plan, list(items), list(images), SampleSettings(frames, 2, size, dropout, seed))


def test_unreadable_and_short_files_are_skipped_and_counted(tmp_path):
    good = numbered_video(tmp_path / "good.mp4", 20)
    short = numbered_video(tmp_path / "short.mp4", 2)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01 not a video at all" * 50)
    items = [MediaItem(str(good)), MediaItem(str(short)), MediaItem(str(broken)), MediaItem(str(tmp_path / "gone.mp4"))]
    dataset = _dataset(items, batch=4)
    reasons = {}
    for index in range(3):
        batch = dataset[dataset.plan.spec(index)]
        assert batch["pixels"].shape == (4, 3, 4, 16, 16) and batch["pixels"].dtype == torch.uint8
        assert set(batch["paths"]) == {str(good)}  # every sample came from the one good file
        reasons.update(batch["skipped"])
    assert set(reasons) == {str(short), str(broken), str(tmp_path / "gone.mp4")}
    assert "too short" in reasons[str(short)] and "no such file" in reasons[str(tmp_path / "gone.mp4")]


def test_all_files_unreadable_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"junk" * 100)
    dataset = _dataset([MediaItem(str(broken))], batch=1)
    with pytest.raises(RuntimeError, match="samples in a row could not be read"):
        dataset[dataset.plan.spec(0)]


def test_image_batches_from_images_or_from_video_frames(tmp_path):
    video = numbered_video(tmp_path / "v.mp4", 30)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for k in range(3):
        write_video(pictures / f"p{k}.png", moving_pattern(1, 24, 24, seed=k))
    images = read_sources([str(pictures)], IMAGE)
    with_images = _dataset([MediaItem(str(video))], images, batch=2, image_every=2)
    batch = with_images[with_images.plan.spec(1)]
    assert batch["kind"] == IMAGE and batch["pixels"].shape == (2, 3, 1, 16, 16)
    assert all(Path(p).parent == pictures for p in batch["paths"])
    from_frames = _dataset([MediaItem(str(video))], batch=3, image_every=2)
    batch = from_frames[from_frames.plan.spec(1)]
    assert batch["pixels"].shape == (3, 3, 1, 16, 16) and batch["paths"] == [str(video)] * 3


def test_workers_resume_and_seeds_give_the_same_stream(tmp_path):
    items = [MediaItem(str(numbered_video(tmp_path / f"{k}.mp4", 40 + 4 * k)), f"clip {k}") for k in range(5)]
    dataset = _dataset(items, batch=2, image_every=3, dropout=0.5)

    def stream(start, workers, count):
        loader = iter(make_loader(dataset, start, workers, 2))
        return [next(loader) for _ in range(count)]

    in_process = stream(0, 0, 6)
    with_workers = stream(0, 2, 6)
    resumed = stream(3, 1, 3)
    for a, b in zip(in_process, with_workers):
        assert torch.equal(a["pixels"], b["pixels"]) and a["captions"] == b["captions"] and a["kind"] == b["kind"]
    for a, b in zip(in_process[3:], resumed):
        assert torch.equal(a["pixels"], b["pixels"]) and a["index"] == b["index"]
    assert [b["kind"] for b in in_process] == [VIDEO, VIDEO, IMAGE] * 2
    other_seed = _dataset(items, batch=2, image_every=3, seed=1)
    assert not torch.equal(other_seed[other_seed.plan.spec(0)]["pixels"], in_process[0]["pixels"])


def test_caption_dropout_share(tmp_path):
    items = [MediaItem(str(numbered_video(tmp_path / "v.mp4", 8)), "a caption")]
    dataset = _dataset(items, batch=1, dropout=0.3)
    dropped = sum(dataset._caption(items[0], VIDEO, p) == "" for p in range(2000))
    assert 500 < dropped < 700
    assert all(_dataset(items, batch=1)._caption(items[0], VIDEO, p) == "a caption" for p in range(50))
