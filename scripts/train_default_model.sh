#!/usr/bin/env bash
# Train the default model in its four stages (docs/default-model.md): prepare the data if needed, train the
# spatial stage on images, then the temporal parts on videos, then the whole model on both, then the whole
# model on clips of mixed frame steps, and leave the model in RUNS/default-refine/model.
#   scripts/train_default_model.sh [RUNS] [SPATIAL_SECONDS] [TEMPORAL_SECONDS] [JOINT_SECONDS] [REFINE_SECONDS]
# A stage given 0 seconds (the default) runs the steps of its config; else it stops after that much training
# time, its cosine schedule following the time. DATA (default data/default), PYTHON, STAGES (which of
# "spatial temporal joint refine" to run; each starts from the previous stage's model in RUNS), and IMAGE_OVERRIDES /
# VIDEO_OVERRIDES (extra key=value settings for the image stage / the video stages) may be set.
set -euo pipefail
runs=${1:-runs}
seconds=("${2:-0}" "${3:-0}" "${4:-0}" "${5:-0}")
data=${DATA:-data/default}
python=${PYTHON:-python}
workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
[ -f "$data/videos.csv" ] || "$python" scripts/prepare_default_data.py "$data" --workers "$(nproc)"
limit() { if [ "$1" -gt 0 ]; then echo "run.max_seconds=$1 run.steps=1000000"; fi; }
sources="data.videos=[$data/videos.csv] data.images=[$data/images.txt]"
previous=""
for stage in spatial temporal joint refine; do
  # the spatial stage has no validation: in video mode its untrained temporal autoencoder would be measured
  validation="validation.videos=[$data/validation.csv]"
  case $stage in spatial) index=0 extra=${IMAGE_OVERRIDES:-} validation="" ;;
                 temporal) index=1 extra=${VIDEO_OVERRIDES:-} ;; joint) index=2 extra=${VIDEO_OVERRIDES:-} ;;
                 refine) index=3 extra=${VIDEO_OVERRIDES:-} ;; esac
  weights=${previous:+model.weights=$previous}
  previous=$runs/default-$stage/model
  [[ " ${STAGES:-spatial temporal joint refine} " == *" $stage "* ]] || continue
  # shellcheck disable=SC2046,SC2086  # these lists of key=value words are meant to split
  "$python" -m cmvae.cli train "configs/default-$stage.yaml" "run.output=$runs/default-$stage" \
    "data.workers=$workers" $sources $validation $weights $extra $(limit "${seconds[$index]}")
done
