#!/usr/bin/env python3
"""Makes examples/object_removal.png: before | mask | after, side by side.

    python scripts/make_object_removal_figure.py --weights completionnet_places2.t7

Removes the mission patch and the name badge from the bundled examples/astronaut.png
(the white boxes of examples/astronaut_mask.png, the mask ``glcic-fast bench -o`` uses too;
or --image with --mask and/or --rect) with glcic_fast.complete, post-processed as the
command line does. Run it only with trained weights: a figure made with a randomly
initialised network (noise in the holes) would show nothing true about the method.
"""

import argparse
import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GAP = 8


def _panel(rgb, title):
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    cv2.putText(bgr, title, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(bgr, title, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
    return bgr


def main(argv=None):
    import glcic_fast
    from glcic_fast.imageio import read_image, tensor_to_array
    from glcic_fast.inference.bench import EXAMPLE_IMAGE, EXAMPLE_MASK, EXAMPLES
    from glcic_fast.inference.masks import hole_mask

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="trained weights (anything glcic_fast.load reads)")
    parser.add_argument("--config", help="GLCIC-PyTorch's config.json (default: beside --weights)")
    parser.add_argument("--image", default=EXAMPLE_IMAGE)
    parser.add_argument("--mask", help="mask image, white = remove (default: examples/astronaut_mask.png "
                        "unless --rect is given)")
    parser.add_argument("--rect", action="append", help="x,y,w,h to remove (repeatable)")
    parser.add_argument("--device", default=None)
    parser.add_argument("-o", "--output", default=os.path.join(EXAMPLES, "object_removal.png"))
    args = parser.parse_args(argv)

    net = glcic_fast.load(args.weights, args.config)
    image = read_image(args.image)
    h, w = image.shape[-2:]
    mask_path = args.mask or (None if args.rect else EXAMPLE_MASK)
    rects = [tuple(int(v) for v in r.split(",")) for r in args.rect or ()]
    mask = hole_mask(h, w, mask_path, rects, image=args.image)
    after = glcic_fast.complete(image, mask, weights=net, device=args.device, postprocess=True)

    before = tensor_to_array(image)
    masked = before.copy()
    masked[mask[0].numpy() > 0.5] = 255
    panels = [_panel(before, "before"), _panel(masked, "mask"), _panel(tensor_to_array(after), "after")]
    spacer = np.full((h, GAP, 3), 255, np.uint8)
    figure = cv2.hconcat([panels[0], spacer, panels[1], spacer, panels[2]])
    if not cv2.imwrite(args.output, figure):
        sys.exit(f"could not write {args.output}")
    print(f"wrote {args.output} ({figure.shape[1]} x {figure.shape[0]}), weights: {net.weights_source}")


if __name__ == "__main__":
    main()
