#!/usr/bin/env bash
# Trains the small demonstration completion network bundled in examples/, on one CUDA GPU,
# offline, from photos that ship with scikit-image and are public domain or CC0 (their
# docstrings say so): coffee, chelsea, rocket, hubble_deep_field, retina,
# immunohistochemistry, camera, brick, grass, gravel. The bundled example (astronaut) is
# held out, with scikit-learn's china.jpg and flower.jpg, for the quality table.
#
#   bash scripts/train_demo.sh [RUN_DIR]        (default runs/demo)
#
# Schedule: the paper's phases and sizes (DEMO_SIZE 256 x 256 crops, DEMO_LOCAL 128 x 128
# local patches, DEMO_HOLES "96 128" px, ADADELTA, alpha 0.0004) with a batch of DEMO_BATCH
# (32) and DEMO_STEPS="TC TD TJ" (6000 600 2400) steps. Ten photos are far too few for a general
# model: the demo shows the pipeline working end to end (losses falling, a checkpoint that
# glcic_fast.load reads, a completion), not a replacement for the authors' Places2 weights.
#
# Training stops after DEMO_MINUTES (8) at the latest, so that the whole script fits in a
# 10-minute command: SIGTERM makes the trainer write a checkpoint and exit, and the steps
# below then use the last checkpoint (the step count reached is stated beside it). Run it
# again with the same RUN_DIR to continue (--resume).
#
# Writes: RUN_DIR/ (checkpoints, losses.csv, tensorboard/, config.json, completionnet.safetensors),
# examples/demo_completionnet.safetensors (the completion net in float16: half the size),
# examples/demo_completionnet.md (data, steps, time, GPU, and the quality table: PSNR
# inside holes on the held-out photos, against OpenCV Telea), examples/object_removal.png.
#
# PYTHON names the interpreter with glcic_fast installed (default .venv/bin/python).
# DEMO_DEVICE (cuda), DEMO_WORKERS (8 data-loader processes) and DEMO_EXAMPLES (examples)
# let it run on a CPU; for a smoke test of this script with a few steps, writing elsewhere:
#   DEMO_DEVICE=cpu DEMO_STEPS="2 1 1" DEMO_BATCH=2 DEMO_EXAMPLES=/tmp/demo bash scripts/train_demo.sh /tmp/demo/run
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RUN="${1:-runs/demo}"
DATA="${DEMO_DATA:-runs/demo_photos}"
read -r TC TD TJ <<< "${DEMO_STEPS:-6000 600 2400}"
BATCH="${DEMO_BATCH:-32}"
MINUTES="${DEMO_MINUTES:-8}"
DEVICE="${DEMO_DEVICE:-cuda}"
SIZE="${DEMO_SIZE:-256}"
LOCAL="${DEMO_LOCAL:-128}"
read -r HOLE_MIN HOLE_MAX <<< "${DEMO_HOLES:-96 128}"
WORKERS="${DEMO_WORKERS:-8}"
EXAMPLES="${DEMO_EXAMPLES:-examples}"
mkdir -p "$EXAMPLES"

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'train_demo.sh needs a CUDA GPU')"
fi

"$PY" - "$DATA" <<'PYEOF'
import os, sys
import cv2
import skimage.data

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
names = ["coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
         "camera", "brick", "grass", "gravel"]
for name in names:
    path = os.path.join(out, f"{name}.png")
    if os.path.exists(path):
        continue
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_RGB2BGR)
    cv2.imwrite(path, image)  # the augmentation rescales the shorter side itself
print(f"{len(names)} photos in {out}")
PYEOF

rc=0
timeout -s TERM "${MINUTES}m" "$PY" -m glcic_fast.cli train "$DATA" --out "$RUN" --resume \
  --phase-steps "$TC" "$TD" "$TJ" --batch-size "$BATCH" --image-size "$SIZE" --local-size "$LOCAL" \
  --hole-range "$HOLE_MIN" "$HOLE_MAX" --device "$DEVICE" --checkpoint-every 100 --keep 2 --seed 0 \
  --workers "$WORKERS" --image-every 500 --no-progress || rc=$?
# 0: finished; 124 / 143: stopped by the time limit after writing a checkpoint.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 143 ]; then
  echo "training failed (exit $rc)" >&2
  exit "$rc"
fi

"$PY" scripts/demo_card.py "$RUN" --examples "$EXAMPLES" --device "$DEVICE"
"$PY" scripts/make_object_removal_figure.py --weights "$EXAMPLES/demo_completionnet.safetensors" \
  --device "$DEVICE" -o "$EXAMPLES/object_removal.png"
