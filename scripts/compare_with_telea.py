#!/usr/bin/env python3
"""PSNR inside the holes of photos a network was not trained on, against OpenCV's Telea:

    python scripts/compare_with_telea.py --weights runs/demo/completionnet.safetensors

Prints a markdown table (also written to -o when given). The photos are
glcic_fast.inference.quality.held_out_photos() (astronaut, china, flower; scikit-learn needed), or
--photo FILE (repeatable). Holes: --holes per photo, sides drawn from --hole-range,
seeded by --seed; see glcic_fast/inference/quality.py for the scoring.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    import glcic_fast
    from glcic_fast.devices import default_device
    from glcic_fast.inference import quality
    from glcic_fast.imageio import read_image_array

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="anything glcic_fast.load reads")
    parser.add_argument("--config", help="GLCIC-PyTorch's config.json (default: beside --weights)")
    parser.add_argument("--photo", action="append", help="a photo file to score (repeatable); default: held-out set")
    parser.add_argument("--size", type=int, default=256, help="shorter side the photos are resized to (256)")
    parser.add_argument("--holes", type=int, default=20, help="holes per photo (20)")
    parser.add_argument("--hole-range", type=int, nargs=2, default=(96, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("-o", "--output", help="also write the table to this file")
    args = parser.parse_args(argv)

    if args.photo:
        photos = {}
        for path in args.photo:
            rgb = read_image_array(path)
            if rgb.shape[2] != 3 or rgb.dtype.name != "uint8":
                sys.exit(f"{path}: expected an 8-bit RGB photo")
            photos[os.path.basename(path)] = quality.resize_shorter_side(rgb, args.size)
    else:
        photos = quality.held_out_photos(args.size)
    net = glcic_fast.load(args.weights, args.config).to(default_device(args.device)).eval()
    scores = quality.compare(net, photos, holes_per_photo=args.holes, hole_range=tuple(args.hole_range),
                             seed=args.seed)
    table = quality.markdown_table(scores)
    note = (f"\nweights: {net.weights_source}; {args.holes} holes per photo, sides {args.hole_range[0]}-"
            f"{args.hole_range[1]} px, seed {args.seed}, photos at shorter side {args.size}")
    print(table + note)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + note + "\n")


if __name__ == "__main__":
    main()
