"""The memory budget: reading sizes, staying within the budget in a fresh process, and output that does
not depend on how the levels ran (whole, in bands of rows or in tiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmvae import CrossModalVAE, save_model
from cmvae.cli import main
from cmvae.budget import RESERVE_BYTES
from cmvae.memory import memory_in_use, parse_size
from cmvae.pipeline import PipelineSettings, VideoPipeline
from cmvae.video_io import write_video

from fresh_process import run_child
from media import moving_pattern
from random_models import with_temporal_layers

CHILD = Path(__file__).resolve().parent / "run_within_budget.py"


# ---- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("6GB", 6 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                        ("2048", 2048), (" 64 MiB ", 64 * 2**20), ("1kb", 1000), (123, 123)])
def test_sizes_are_read_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["junk", "", "6 GBs", "GB", "1.2.3GB", "-5GB", "6 XB"])
def test_sizes_that_are_not_sizes_are_refused(text):
    with pytest.raises(ValueError, match="cannot read a memory size") as error:
        parse_size(text)
    assert repr(text) in str(error.value)


def test_settings_read_the_budget_and_refuse_junk():
    assert PipelineSettings(memory_budget="1.5GiB").memory_budget == 3 * 2**29
    with pytest.raises(ValueError, match="memory size"):
        PipelineSettings(memory_budget="plenty")


def test_junk_max_memory_on_the_command_line_is_one_error_line(tmp_path, capsys):
    model = save_model(CrossModalVAE.from_preset("tiny"), tmp_path / "tiny")
    clip = write_video(tmp_path / "clip.mp4", moving_pattern(4, 32, 32))
    try:
        code = main(["reconstruct", str(clip), "-o", str(tmp_path / "out.mp4"), "--model", str(model),
                     "--max-memory", "junk"])
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("cmvae reconstruct: error: ") and "'junk'" in errors[0], err
    assert not (tmp_path / "out.mp4").exists()


def test_reconstruct_help_names_the_budget(capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-memory SIZE" in text and "expert override of --max-memory" in text
    assert "None" not in text


# ---- exact whatever the budget ----------------------------------------------------------------------


@pytest.mark.parametrize("room, size, ways", [(0, (48, 64), {"tiles"}), (24 * 2**20, (64, 192), {"bands", "whole"})])
def test_a_small_budget_gives_the_untiled_output(room, size, ways):
    """With no room beside what the process holds every level runs in tiles; with a little room the
    full-resolution levels run in bands and the deeper ones whole. Either way the float32 output is the
    untiled output up to rounding."""
    torch.manual_seed(0)
    model = with_temporal_layers(CrossModalVAE.from_preset("tiny"))
    frames = moving_pattern(4, *size)
    run = lambda **s: VideoPipeline(model, PipelineSettings(device="cpu", dtype="float32", **s))  # noqa: E731
    untiled = run(tile=0).reconstruct_array(frames)
    small = run(memory_budget=memory_in_use(torch.device("cpu")) + RESERVE_BYTES + room if room else 1)
    within = small.reconstruct_array(frames)
    assert {record.how for record in small.levels.records} == ways
    assert within.shape == untiled.shape == (4, *size, 3)
    np.testing.assert_allclose(within, untiled, atol=1e-4)


# ---- a fresh process within its budget --------------------------------------------------------------

CLIP = {"frames": 8, "height": 256, "width": 256}


def _fresh_run(settings: dict, output: Path) -> dict:
    spec = {**CLIP, "settings": settings, "output": str(output)}
    return run_child(CHILD, spec)


def test_a_fresh_process_stays_within_its_budget(tmp_path):
    """The budget bounds the whole process. A fresh process holds about 0.9 GB (libraries, weights) before
    it reads a frame, more than half of this clip's untiled peak, so the budgets are that footprint plus
    0.5, 1 and 1.5 times the untiled run's working set (its peak above the footprint). Each process peaks
    within its budget + 5%, runs every level whole where the budget is ample and some in bands or tiles
    where it is not, and gives the untiled output."""
    untiled = _fresh_run({"tile": 0}, tmp_path / "untiled.npy")
    working_set = untiled["peak"] - untiled["before"]
    assert working_set > 0.25 * untiled["peak"]  # the clip is large enough for the budget to matter
    reference = np.load(tmp_path / "untiled.npy")
    for fraction in (0.5, 1.0, 1.5):
        budget = untiled["before"] + int(fraction * working_set)
        result = _fresh_run({"memory_budget": budget}, tmp_path / f"{fraction}.npy")
        assert result["peak"] <= 1.05 * budget, (fraction, budget, result)
        if fraction == 1.5:
            assert set(result["levels"]) == {"whole"}, result
        if fraction == 0.5:
            assert set(result["levels"]) & {"bands", "tiles"}, result
        np.testing.assert_allclose(np.load(tmp_path / f"{fraction}.npy"), reference, atol=1e-4)
