"""A model's learning curve across runs, kept beside its weights.

Every run that exports a model writes `training_history.json` into the model folder: the points of
the runs it continued from, then its own, each at the number of training samples (clips and images)
the model had seen by then. A run that starts from that folder (`model.init: pretrained`) carries
the curve on, so the curve of a model trained in stages reads end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_path

HISTORY_FILE = "training_history.json"


class TrainingHistory:
    def __init__(self, stage: str, earlier: list[dict] | None = None):
        self.stage = stage
        self.earlier = earlier or []  # points of the runs this one continues
        self.points: list[dict] = []  # this run's
        self.samples_before = max((p["samples"] for p in self.earlier), default=0)

    @classmethod
    def continuing(cls, weights: str | Path | None, stage: str) -> TrainingHistory:
        """The history of the model in folder `weights` (if it has one), to be continued by `stage`."""
        path = Path(weights) / HISTORY_FILE if weights else None
        earlier = json.loads(path.read_text())["points"] if path is not None and path.is_file() else []
        return cls(stage, earlier)

    def add(self, samples_in_run: int, step: int, values: dict[str, float]) -> None:
        """Values at step `step` of this run, after it saw `samples_in_run` samples."""
        point = {"stage": self.stage, "step": step, "samples": self.samples_before + samples_in_run}
        if self.points and (self.points[-1]["step"], self.points[-1]["stage"]) == (step, self.stage):
            self.points[-1].update(values)  # a validation at a logging step joins its point
        else:
            self.points.append({**point, **values})

    def state_dict(self) -> dict:
        return {"stage": self.stage, "earlier": self.earlier, "points": self.points}

    def load_state_dict(self, state: dict) -> None:
        self.earlier, self.points = state["earlier"], state["points"]
        self.samples_before = max((p["samples"] for p in self.earlier), default=0)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / HISTORY_FILE
        with atomic_path(path) as temp:
            temp.write_text(json.dumps({"points": self.earlier + self.points}, indent=1))
        return path
