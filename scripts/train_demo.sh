#!/usr/bin/env bash
# Trains a small demonstration completion network on one CUDA GPU, offline, from photos
# that ship with scikit-image and are public domain or CC0 (their docstrings say so):
# astronaut, coffee, chelsea, rocket, hubble_deep_field, retina, immunohistochemistry,
# camera, brick, grass, gravel, horse.
#
#   bash scripts/train_demo.sh [RUN_DIR]        (default runs/demo)
#
# Schedule: the paper's phases and sizes (256 x 256 crops, 128 x 128 local patches, holes
# of 96-128 px, batch 96, ADADELTA, alpha 0.0004) with fewer steps:
#   Tc = 4000 completion-only steps, Td = 400 discriminator steps, 3600 joint steps:
#   8000 steps in all, about 20 minutes at the 0.15 s per joint step targeted on an H100.
# Twelve photos are far too few for a general model: the demo shows the pipeline working
# end to end (losses falling, a checkpoint that glcic_fast.load reads, a completion), not
# a replacement for the authors' Places2 weights.
#
# Resumable: run the same command again after an interruption (it passes --resume).
# Outputs in RUN_DIR: checkpoint-*.pt (the last 3), completionnet.safetensors (the
# completion net for glcic_fast.load), losses.csv, tensorboard/, config.json, and
# demo_completion.png (astronaut with a hole, completed by the trained net).
#
# PYTHON names the interpreter with glcic_fast installed (default .venv/bin/python);
# TensorBoard logging needs `pip install 'glcic_fast[train]'` (or tensorboard).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RUN="${1:-runs/demo}"
DATA="${DEMO_DATA:-runs/demo_photos}"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'train_demo.sh needs a CUDA GPU')"

"$PY" - "$DATA" <<'EOF'
import os, sys
import cv2
import skimage.data

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
         "camera", "brick", "grass", "gravel", "horse"]
for name in names:
    path = os.path.join(out, f"{name}.png")
    if os.path.exists(path):
        continue
    image = getattr(skimage.data, name)()
    if image.dtype == bool:
        image = image.astype("uint8") * 255
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_RGB2BGR)
    h, w = image.shape[:2]
    if min(h, w) < 256:  # the augmentation rescales the shorter side to 256-384 anyway
        s = 256 / min(h, w)
        image = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(path, image)
print(f"{len(names)} photos in {out}")
EOF

"$PY" -m glcic_fast.cli train "$DATA" --out "$RUN" --resume \
  --phase-steps 4000 400 3600 --batch-size 96 --image-size 256 --local-size 128 --hole-range 96 128 \
  --device cuda --checkpoint-every 500 --keep 3 --seed 0 --workers 8 --image-every 250

"$PY" - "$RUN" <<'EOF'
import os, sys
import cv2
import numpy as np
import skimage.data
import torch
import glcic_fast

run = sys.argv[1]
net = glcic_fast.load(os.path.join(run, "completionnet.safetensors")).cuda().eval()
image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float().div(255)
mask = torch.zeros(1, *image.shape[1:])
mask[:, 180:300, 200:310] = 1
with torch.no_grad():
    out = net.complete(image.cuda(), mask.cuda()).cpu()
rgb = (out.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
path = os.path.join(run, "demo_completion.png")
cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
print(f"wrote {path} ({net.weights_source})")
EOF
