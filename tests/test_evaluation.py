"""`cmvae eval`: two folders of real clips (ground truth and lossy copies made here with PyAV) and a
model on a dataset, checked against an independent NumPy / scikit-image computation."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from cmvae.evaluation import (Clip, EvalSettings, Reconstructor, VideoScorer, evaluate_model, fixed_chunks,
                              read_dataset, write_reports)
from cmvae.evaluation_command import main, register
from cmvae.models import CMVAEConfig, CrossModalVAE
from cmvae.video_io import EncodeSettings

from media import encode_file, moving_pattern, sample_clip

REPO = Path(__file__).resolve().parents[1]


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def lossy_copy(source: Path, target: Path, crf: int) -> Path:
    return encode_file(target, decode_rgb(source), codec="libx264", pix_fmt="yuv420p", options={"crf": str(crf)})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two real clips, exact, and H.264 copies at CRF 30 and 24 (one in the authors' _reconstructed naming)."""
    root = tmp_path_factory.mktemp("folders")
    truth, recon = root / "truth", root / "recon"
    truth.mkdir()
    recon.mkdir()
    bikes = sample_clip("bikes", 10, truth / "bikes.mp4", crop=(64, 96))
    carphone = sample_clip("carphone", 7, truth / "carphone.mkv", crop=(48, 64))
    lossy_copy(bikes, recon / "bikes_reconstructed.mp4", 30)
    lossy_copy(carphone, recon / "carphone.mp4", 24)
    return truth, recon


@pytest.fixture(autouse=True)
def no_lpips_weights(tmp_path, monkeypatch):
    """An empty torch hub cache: LPIPS weights are never found unless a test provides them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def independent_scores(truth: np.ndarray, recon: np.ndarray) -> dict:
    """The protocol written out with NumPy and scikit-image, frame by frame."""
    a, b = truth.astype(np.float64), recon.astype(np.float64)
    psnr = [10 * np.log10(255.0**2 / np.mean((a[t] - b[t]) ** 2)) for t in range(len(a))]
    ranges = [int(frame.max()) - int(frame.min()) for frame in truth]
    ssim = [structural_similarity(truth[t], recon[t], channel_axis=-1, data_range=ranges[t]) for t in range(len(a))]
    ssim_standard = [structural_similarity(truth[t], recon[t], channel_axis=-1, data_range=255) for t in range(len(a))]
    steps = [10 * np.log10(255.0**2 / np.mean(((b[t] - b[t - 1]) - (a[t] - a[t - 1])) ** 2)) for t in range(1, len(a))]
    return {"psnr": psnr, "ssim": ssim, "ssim_standard": ssim_standard, "temporal_psnr": steps}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_register_adds_both_commands_to_another_parser():
    parser = argparse.ArgumentParser(prog="cmvae")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "a", "b", "-o", "out", "--chunk-frames", "16"])
    assert callable(args.run) and args.chunk_frames == 16 and args.reconstructions == "b"
    args = parser.parse_args(["compare", "clips", "--model", "tiny", "--model", "w=wan", "-o", "out"])
    assert callable(args.run) and args.model == ["tiny", "w=wan"]


def test_eval_of_two_folders_matches_an_independent_computation(folders, tmp_path, capsys):
    truth_dir, recon_dir = folders
    out = tmp_path / "report"
    code, stdout, stderr = run(["eval", str(truth_dir), str(recon_dir), "-o", str(out), "--chunk-frames", "4",
                                "--lpips-random-backbone"], capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())

    expected = {"bikes": independent_scores(decode_rgb(truth_dir / "bikes.mp4"),
                                            decode_rgb(recon_dir / "bikes_reconstructed.mp4")),
                "carphone": independent_scores(decode_rgb(truth_dir / "carphone.mkv"),
                                               decode_rgb(recon_dir / "carphone.mp4"))}
    videos = {v["name"]: v for v in report["videos"]}
    assert sorted(videos) == ["bikes", "carphone"]
    assert videos["bikes"]["frames"] == 10 and videos["carphone"]["frames"] == 7
    for name, scores in expected.items():
        for metric, values in scores.items():
            assert videos[name]["summary"][metric] == pytest.approx(np.mean(values), abs=1e-6), (name, metric)

    # pooled: every frame of every video counts once; per-video mean: each video counts once
    for metric in ("psnr", "ssim", "ssim_standard", "temporal_psnr"):
        every_frame = expected["bikes"][metric] + expected["carphone"][metric]
        assert report["pooled"][metric] == pytest.approx(np.mean(every_frame), abs=1e-6)
        per_video = [np.mean(expected["bikes"][metric]), np.mean(expected["carphone"][metric])]
        assert report["per_video_mean"][metric] == pytest.approx(np.mean(per_video), abs=1e-6)
    assert report["pooled"]["psnr"] != pytest.approx(report["per_video_mean"]["psnr"], abs=1e-3)

    # chunks of 4: cuts before frames 4 and 8 (bikes, 10 frames) and 4 (carphone, 7 frames)
    bikes, carphone = expected["bikes"]["psnr"], expected["carphone"]["psnr"]
    boundary = [bikes[t] for t in (3, 4, 7, 8)] + [carphone[t] for t in (3, 4)]
    interior = [bikes[t] for t in (0, 1, 2, 5, 6, 9)] + [carphone[t] for t in (0, 1, 2, 5, 6)]
    assert report["pooled"]["boundary_psnr"] == pytest.approx(np.mean(boundary), abs=1e-6)
    assert report["pooled"]["interior_psnr"] == pytest.approx(np.mean(interior), abs=1e-6)
    steps = expected["bikes"]["temporal_psnr"]  # steps[t - 1] is the step into frame t
    across = [steps[3], steps[7], expected["carphone"]["temporal_psnr"][3]]
    assert report["pooled"]["temporal_psnr_at_cuts"] == pytest.approx(np.mean(across), abs=1e-6)

    # the CSVs hold the same numbers, frame by frame
    frames = read_csv(out / "per_frame.csv")
    assert len(frames) == 17
    bikes_rows = [r for r in frames if r["video"] == "bikes"]
    assert [float(r["psnr"]) for r in bikes_rows] == pytest.approx(bikes, abs=1e-9)
    assert bikes_rows[0]["temporal_psnr"] == "" and bikes_rows[3]["boundary"] == "True"
    assert all(0 < float(r["lpips"]) for r in frames)
    pooled = {r["averaging"]: r for r in read_csv(out / "pooled.csv")}
    assert float(pooled["pooled"]["psnr"]) == pytest.approx(report["pooled"]["psnr"])
    per_video = {r["video"]: r for r in read_csv(out / "per_video.csv")}
    assert float(per_video["carphone"]["ssim"]) == pytest.approx(np.mean(expected["carphone"]["ssim"]), abs=1e-6)

    assert "RANDOM" in report["lpips"] and "8-bit" in report["scoring"]
    markdown = (out / "report.md").read_text()
    assert "pooled over all frames (paper)" in markdown and "mean of per-video means" in markdown
    assert f"{report['pooled']['psnr']:.2f}" in markdown
    for png in [out / "plots" / "psnr_bikes.png", out / "plots" / "psnr_carphone.png", out / "worst_frames.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "report.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert "pooled: PSNR" in stdout


def test_lossier_copies_score_lower(folders, tmp_path, capsys):
    truth_dir, _ = folders
    worse = tmp_path / "worse"
    worse.mkdir()
    lossy_copy(truth_dir / "bikes.mp4", worse / "bikes.mp4", 45)
    lossy_copy(truth_dir / "carphone.mkv", worse / "carphone.mp4", 45)
    assert run(["eval", str(truth_dir), str(worse), "-o", str(tmp_path / "r"), "--no-plots"], capsys)[0] == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["pooled"]["psnr"] < 30
    assert report["pooled"]["boundary_psnr"] is None
    assert any("--chunk-frames" in note for note in report["notes"])


def test_lpips_without_weights_is_skipped_with_a_note(folders, tmp_path, capsys):
    truth_dir, recon_dir = folders
    code, stdout, _ = run(["eval", str(truth_dir), str(recon_dir), "-o", str(tmp_path / "r"), "--no-plots"], capsys)
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["lpips"].startswith("LPIPS skipped") and "alexnet-owt-7be5be79.pth" in report["lpips"]
    assert report["pooled"]["lpips"] is None
    assert all(row["lpips"] == "" for row in read_csv(tmp_path / "r" / "per_frame.csv"))
    assert "LPIPS skipped" in (tmp_path / "r" / "report.md").read_text()
    assert "LPIPS skipped" in stdout


def test_require_lpips_fails_clearly_and_writes_nothing(folders, tmp_path, capsys):
    truth_dir, recon_dir = folders
    code, _, stderr = run(["eval", str(truth_dir), str(recon_dir), "-o", str(tmp_path / "r"), "--require-lpips"],
                          capsys)
    assert code == 1
    assert stderr.count("\n") == 1 and "AlexNet" in stderr and "--lpips-weights" in stderr
    assert not (tmp_path / "r").exists()


def test_lpips_weights_from_a_given_path(folders, tmp_path, capsys):
    import torchvision

    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    truth_dir, recon_dir = folders
    code, _, stderr = run(["eval", str(truth_dir), str(recon_dir), "-o", str(tmp_path / "r"), "--no-plots",
                           "--require-lpips", "--lpips-weights", str(weights)], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert str(weights) in report["lpips"] and report["pooled"]["lpips"] > 0


def test_mismatched_folders_fail_with_one_line(folders, tmp_path, capsys):
    truth_dir, recon_dir = folders
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "bikes.mp4").write_bytes((recon_dir / "bikes_reconstructed.mp4").read_bytes())
    code, _, stderr = run(["eval", str(truth_dir), str(partial), "-o", str(tmp_path / "r")], capsys)
    assert code == 1 and "carphone" in stderr and "_reconstructed" in stderr and stderr.count("\n") == 1

    short = tmp_path / "short"
    short.mkdir()
    (short / "bikes.mp4").write_bytes((recon_dir / "bikes_reconstructed.mp4").read_bytes())
    encode_file(short / "carphone.mp4", decode_rgb(truth_dir / "carphone.mkv")[:5])
    code, _, stderr = run(["eval", str(truth_dir), str(short), "-o", str(tmp_path / "r")], capsys)
    assert code == 1 and "has 5 frames" in stderr and "--max-frames 5" in stderr
    assert not (tmp_path / "r").exists()

    resized = tmp_path / "resized"
    resized.mkdir()
    (resized / "bikes.mp4").write_bytes((recon_dir / "bikes_reconstructed.mp4").read_bytes())
    encode_file(resized / "carphone.mp4", decode_rgb(truth_dir / "carphone.mkv")[:, :40])
    code, _, stderr = run(["eval", str(truth_dir), str(resized), "-o", str(tmp_path / "r")], capsys)
    assert code == 1 and "64x40" in stderr and "64x48" in stderr

    code, _, stderr = run(["eval", str(truth_dir), str(recon_dir), "--model", "tiny", "-o", str(tmp_path / "r")],
                          capsys)
    assert code == 1 and "not both" in stderr
    code, _, stderr = run(["eval", str(truth_dir), str(recon_dir), "--float", "-o", str(tmp_path / "r")], capsys)
    assert code == 1 and "--float" in stderr


def test_longer_reconstructions_are_scored_on_the_ground_truth_frames(folders, tmp_path, capsys):
    truth_dir, _ = folders
    padded = tmp_path / "padded"
    padded.mkdir()
    frames = decode_rgb(truth_dir / "carphone.mkv")
    encode_file(padded / "carphone_reconstructed.mkv", np.concatenate([frames, frames[-1:]]))  # exact, one extra
    single = tmp_path / "single"
    single.mkdir()
    (single / "carphone.mkv").write_bytes((truth_dir / "carphone.mkv").read_bytes())
    code, _, stderr = run(["eval", str(single), str(padded), "-o", str(tmp_path / "r"), "--no-plots"], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["videos"][0]["frames"] == 7
    assert report["pooled"]["psnr"] == "inf"  # lossless copy: identical frames
    assert report["pooled"]["ssim"] == pytest.approx(1.0)
    assert "1 more frames" in report["videos"][0]["notes"][0]


def test_images_are_scored_as_one_frame_videos(tmp_path, capsys):
    from skimage import data
    from skimage.metrics import peak_signal_noise_ratio

    from cmvae.video_io import write_video

    truth, recon = tmp_path / "truth", tmp_path / "recon"
    truth.mkdir()
    recon.mkdir()
    photo = np.ascontiguousarray(data.astronaut()[::4, ::4])
    write_video(truth / "astronaut.png", photo)
    write_video(recon / "astronaut_reconstructed.jpg", photo)  # JPEG: lossy
    code, _, stderr = run(["eval", str(truth), str(recon), "-o", str(tmp_path / "r"), "--no-plots"], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    original, jpeg = decode_rgb(truth / "astronaut.png")[0], decode_rgb(recon / "astronaut_reconstructed.jpg")[0]
    assert np.array_equal(original, photo)
    assert report["pooled"]["frames"] == 1 and report["pooled"]["temporal_psnr"] is None
    assert report["pooled"]["psnr"] == pytest.approx(peak_signal_noise_ratio(original, jpeg, data_range=255), abs=1e-9)


def test_worst_frames_are_the_lowest_psnr():
    rng = np.random.default_rng(0)
    truth = rng.integers(20, 230, size=(6, 16, 16, 3)).astype(np.uint8)
    errors = [1, 9, 2, 7, 3, 4]  # a constant offset per frame
    scorer = VideoScorer("v", keep_worst=2)
    for frame, error in zip(truth, errors, strict=True):
        scorer.add(frame, frame + np.uint8(error))
    result = scorer.finish("a", "b")
    assert [w.frame for w in result.worst] == [1, 3]
    assert result.worst[0].psnr == pytest.approx(20 * math.log10(255 / 9))


# ---- a model on a dataset -------------------------------------------------------------------------


def tiny_model() -> CrossModalVAE:
    torch.manual_seed(0)
    cfg = CMVAEConfig(base_channels=8, channel_multipliers=(1, 2, 2, 2), temporal_channels=8, norm_num_groups=4,
                      num_res_blocks=1, latent_channels=4)
    return CrossModalVAE.from_cmvae_config(cfg).eval()


def direct_reconstructor(model: CrossModalVAE) -> Reconstructor:
    """Our model called directly on whole clips of a multiple of 4 frames (not the pipeline)."""
    def reconstruct(frames: np.ndarray, caption):
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            y = model.decode(model.encode(x).latent_dist.mode(), image_mode=False).sample
        return ((y[0].permute(1, 2, 3, 0) + 1) / 2).numpy()

    return Reconstructor(reconstruct, fixed_chunks(8), "direct")


def test_model_on_a_csv_dataset_scores_the_quantised_reconstruction(tmp_path):
    clips_dir = tmp_path / "clips"
    clips_dir.mkdir()
    encode_file(clips_dir / "pattern.mkv", moving_pattern(8, 32, 48), codec="ffv1", pix_fmt="bgr0")
    (tmp_path / "set.csv").write_text("path,caption\nclips/pattern.mkv,a moving pattern\n")
    clips = read_dataset(tmp_path / "set.csv")
    assert clips[0].caption == "a moving pattern" and clips[0].path == tmp_path / "clips" / "pattern.mkv"

    reconstructor = direct_reconstructor(tiny_model())
    frames = decode_rgb(clips_dir / "pattern.mkv")
    output = reconstructor.reconstruct(frames, None)
    eight_bit = np.round(np.clip(output, 0, 1) * np.float32(255))  # what a saved file would hold
    as_floats = np.clip(output, 0, 1) * 255

    quantised = evaluate_model(clips, reconstructor, EvalSettings(worst_frames=1))
    floating = evaluate_model(clips, reconstructor, EvalSettings(float_scoring=True))
    for report, recon in ((quantised, eight_bit), (floating, as_floats)):
        expected = [10 * np.log10(255.0**2 / np.mean((frames[t] - recon[t]) ** 2)) for t in range(8)]
        assert report.pooled.psnr == pytest.approx(np.mean(expected), abs=1e-6)
    assert quantised.pooled.psnr != floating.pooled.psnr
    assert "8-bit" in quantised.scoring and "float" in floating.scoring
    assert quantised.videos[0].notes == ["caption ignored: the model has no text conditioning"]
    assert quantised.videos[0].chunk_starts == [0]  # 8 frames, chunks of 8: no cut
    written = write_reports(quantised, tmp_path / "out")
    assert {p.name for p in written} >= {"report.json", "report.md", "worst_frames.png", "psnr_pattern.png"}


def test_reencoding_in_memory_reconstructions_is_scored_from_the_decoded_file(tmp_path):
    encode_file(tmp_path / "bars.mkv", moving_pattern(6, 32, 32, seed=3), codec="ffv1", pix_fmt="bgr0")
    identity = Reconstructor(lambda frames, caption: frames / 255.0, None, "identity")
    clips = [Clip("bars", tmp_path / "bars.mkv")]
    exact = evaluate_model(clips, identity, EvalSettings())
    assert exact.pooled.psnr == math.inf
    reencoded = evaluate_model(clips, identity, EvalSettings(reencode_crf=40))
    assert 10 < reencoded.pooled.psnr < 40 and "CRF 40" in reencoded.scoring


def test_datasets_as_lists_and_their_errors(tmp_path):
    encode_file(tmp_path / "a.mkv", moving_pattern(4, 16, 16), codec="ffv1", pix_fmt="bgr0")
    (tmp_path / "sub").mkdir()
    encode_file(tmp_path / "sub" / "a.mkv", moving_pattern(4, 16, 16), codec="ffv1", pix_fmt="bgr0")
    (tmp_path / "list.txt").write_text("# clips\na.mkv\tfirst caption\n\nsub/a.mkv\n")
    clips = read_dataset(tmp_path / "list.txt")
    assert [(c.name, c.caption) for c in clips] == [("a", "first caption"), ("a_2", None)]
    assert [c.name for c in read_dataset(tmp_path / "a.mkv")] == ["a"]
    (tmp_path / "bad.csv").write_text("file,caption\na.mkv,x\n")
    with pytest.raises(ValueError, match="'path'"):
        read_dataset(tmp_path / "bad.csv")
    (tmp_path / "missing.txt").write_text("nope.mp4\n")
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset(tmp_path / "missing.txt")


def test_eval_of_a_model_through_the_pipeline(tmp_path, capsys):
    pytest.importorskip("cmvae.pipeline", reason="cmvae.pipeline has not landed yet")
    from cmvae.pipeline import PipelineSettings, VideoPipeline

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    encode_file(tmp_path / "clip.mkv", moving_pattern(10, 32, 40), codec="ffv1", pix_fmt="bgr0")
    code, _, stderr = run(["eval", str(tmp_path / "clip.mkv"), "--model", str(folder), "-o", str(tmp_path / "r"),
                           "--no-plots", "--device", "cpu", "--chunk-frames", "4", "--tile", "0", "--dtype", "float32"], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["mode"] == "model" and report["videos"][0]["frames"] == 10
    assert report["videos"][0]["chunk_starts"] == [4, 8]  # 10 frames padded to 12, chunks of 4
    assert "chunk_frames=4" in report["source"]["reconstruction"]

    pipe = VideoPipeline(CrossModalVAE.from_pretrained(folder), PipelineSettings(chunk_frames=4, tile=0, device="cpu",
                                                                                 dtype="float32"))
    frames = decode_rgb(tmp_path / "clip.mkv")
    recon = np.round(np.clip(pipe.reconstruct_array(frames), 0, 1) * np.float32(255))
    expected = [10 * np.log10(255.0**2 / np.mean((frames[t] - recon[t]) ** 2)) for t in range(10)]
    assert report["pooled"]["psnr"] == pytest.approx(np.mean(expected), abs=1e-6)
    boundary = [expected[t] for t in (3, 4, 7, 8)]
    assert report["pooled"]["boundary_psnr"] == pytest.approx(np.mean(boundary), abs=1e-6)

    # the file route: a lossless file written by the pipeline, scored as a folder, gives the same figures
    truth, recon_dir = tmp_path / "truth", tmp_path / "recon"
    truth.mkdir()
    recon_dir.mkdir()
    (truth / "clip.mkv").write_bytes((tmp_path / "clip.mkv").read_bytes())
    pipe.reconstruct(truth / "clip.mkv", recon_dir / "clip_reconstructed.mp4",
                     encode_settings=EncodeSettings(lossless=True))
    assert run(["eval", str(truth), str(recon_dir), "-o", str(tmp_path / "files"), "--no-plots",
                "--chunk-frames", "4"], capsys)[0] == 0
    from_files = json.loads((tmp_path / "files" / "report.json").read_text())
    assert from_files["pooled"] == report["pooled"]


# ---- torchrun ------------------------------------------------------------------------------------


def test_torchrun_splits_the_videos_and_gathers_the_same_report(folders, tmp_path, capsys):
    truth_dir, recon_dir = folders
    assert run(["eval", str(truth_dir), str(recon_dir), "-o", str(tmp_path / "one"), "--no-plots"], capsys)[0] == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cmvae.evaluation_command", "eval", str(truth_dir), str(recon_dir), "-o", str(tmp_path / "two"),
               "--no-plots", "--device", "cpu"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    shared = json.loads((tmp_path / "two" / "report.json").read_text())
    assert shared["source"]["ranks"] == 2 and single["source"]["ranks"] == 1
    assert [v["name"] for v in shared["videos"]] == ["bikes", "carphone"]
    assert shared["videos"] == single["videos"]
    assert shared["pooled"] == single["pooled"]
    assert finished.stdout.count("reports written") == 1  # rank 0 alone writes and prints
