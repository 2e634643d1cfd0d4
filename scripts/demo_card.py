#!/usr/bin/env python3
"""Bundles a demo run: the completion net in float16 and its card (data, steps, hours,
machine, quality table), as scripts/train_demo.sh does after training.

    python scripts/demo_card.py RUN_DIR [--examples examples] [--device cuda]

The weights and the step they were saved at come from the run's newest checkpoint (not
from losses.csv, which may run past it when a run is stopped between checkpoints).
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHOTOS = ("coffee, chelsea, rocket, hubble_deep_field, retina, immunohistochemistry, camera, brick, grass, gravel")


def main(argv=None):
    import torch

    import glcic_fast
    from glcic_fast.devices import default_device
    from glcic_fast.inference import quality
    from glcic_fast.training.checkpoints import latest_checkpoint
    from glcic_fast.training.run_folder import CONFIG_FILE, LOSSES_FILE, WEIGHTS_FILE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the training run folder")
    parser.add_argument("--examples", default=os.path.join(ROOT, "examples"), help="where to write (examples/)")
    parser.add_argument("--device", default=str(default_device()))
    args = parser.parse_args(argv)

    found = latest_checkpoint(args.run)
    if found is None:
        sys.exit(f"no readable checkpoint in {args.run}")
    _, state = found
    step = int(state["step"])

    with open(os.path.join(args.run, CONFIG_FILE)) as f:
        config = json.load(f)["config"]
    size, local = int(config["image_size"]), int(config["local_size"])
    hole_min, hole_max = (int(v) for v in config["hole_range"])
    steps = " / ".join(str(v) for v in config["phase_steps"])
    batch = config["batch_size"]

    trained = glcic_fast.load(os.path.join(args.run, WEIGHTS_FILE)).to(args.device).eval()
    bundled = os.path.join(args.examples, "demo_completionnet.safetensors")
    os.makedirs(args.examples, exist_ok=True)
    glcic_fast.save(glcic_fast.load(os.path.join(args.run, WEIGHTS_FILE)).half(), bundled)
    net = glcic_fast.load(bundled).to(args.device).eval()  # what users get: the float16 file, run in float32
    photos = quality.held_out_photos(size)  # at the training scale
    crop = photos["astronaut"][None, :, :size, :size].to(args.device)
    x = trained.prepare_input(crop, torch.zeros(1, 1, size, size, device=args.device))
    with torch.inference_mode():
        half_diff = (net(x) - trained(x)).abs().max().item()

    with open(os.path.join(args.run, LOSSES_FILE)) as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    # Training time over every (resumed) run: each logged row's seconds per step times its steps.
    previous, hours = 0, 0.0
    for row in rows:
        hours += float(row["sec_per_step"]) * (int(row["step"]) - previous) / 3600
        previous = int(row["step"])
    last = rows[-1] if rows else {}
    scores = quality.compare(net, photos, holes_per_photo=20, hole_range=(hole_min, hole_max), seed=0)
    table = quality.markdown_table(scores)
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"the {os.cpu_count()}-core CPU dev machine ({platform.machine()})")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    text = f"""# The demo checkpoint: `demo_completionnet.safetensors`

Trained by `bash scripts/train_demo.sh` with this repository's trainer (commit `{commit}`)
on {where}, torch {torch.__version__}.

- Data: ten photos bundled with scikit-image (public domain or CC0): {PHOTOS}.
- Schedule: phases Tc / Td / Tj of {steps} steps planned, batch {batch}, {size} x {size} crops,
  {local} x {local} local patches, holes of {hole_min}-{hole_max} px. These weights are from step
  {step} (phase {state['phase']}), after {hours:.2f} hours of training; MSE over the last
  logged steps {float(last.get('mse', 'nan')):.4f}.
- Stored in float16 (loads as float32; largest output change from the float32 net on a
  {size} x {size} crop of the astronaut: {half_diff:.1e}). A demonstration of the pipeline, trained on far
  too few photos and steps for general use: for real work load the authors' Places2 weights.

Quality on photos it never saw (astronaut from scikit-image; china.jpg and flower.jpg from
scikit-learn, CC BY 2.0) at the training scale (shorter side {size}), 20 random holes of
{hole_min}-{hole_max} px per photo, PSNR inside the holes
(`python scripts/compare_with_telea.py --weights examples/demo_completionnet.safetensors --size {size} --hole-range {hole_min} {hole_max}`):

{table}

"flat fill + blend" is the paper's post-processing (Telea, then Poisson blending) applied to
holes filled with the photo's mean colour: what the blend does without any network. The
network earns its place where "glcic_fast + blend" beats it.
"""
    with open(os.path.join(args.examples, "demo_completionnet.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
