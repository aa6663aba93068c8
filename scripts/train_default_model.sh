#!/usr/bin/env bash
# Train the default model in its two stages (docs/default-model.md): prepare the data if needed, train the
# spatial stage on images, then the temporal parts on videos, and leave the model in RUNS/default-temporal/model.
#   scripts/train_default_model.sh [RUNS] [SPATIAL_SECONDS] [TEMPORAL_SECONDS]
# A stage given 0 seconds (the default) runs the steps of its config; else it stops after that much training
# time, its cosine schedule following the time. DATA (default data/default) and PYTHON may be set.
set -euo pipefail
runs=${1:-runs}
spatial_seconds=${2:-0}
temporal_seconds=${3:-0}
data=${DATA:-data/default}
python=${PYTHON:-python}
workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
[ -f "$data/videos.csv" ] || "$python" scripts/prepare_default_data.py "$data" --workers "$(nproc)"
limit() { if [ "$1" -gt 0 ]; then echo "run.max_seconds=$1 run.steps=1000000"; fi; }
# shellcheck disable=SC2046  # limit's words are meant to split
"$python" -m cmvae.cli train configs/default-spatial.yaml "run.output=$runs/default-spatial" "data.workers=$workers" \
  "data.videos=[$data/videos.csv]" "data.images=[$data/images.txt]" $(limit "$spatial_seconds")
# shellcheck disable=SC2046
"$python" -m cmvae.cli train configs/default-temporal.yaml "run.output=$runs/default-temporal" "data.workers=$workers" \
  "model.weights=$runs/default-spatial/model" "data.videos=[$data/videos.csv]" \
  "validation.videos=[$data/validation.csv]" $(limit "$temporal_seconds")
