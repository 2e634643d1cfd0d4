"""``glcic-fast export``: trained weights as an ONNX file for ONNX Runtime, TensorRT (also
under Triton Inference Server) and OpenVINO; the work is in glcic_fast.inference.export.

    glcic-fast export --weights completionnet_places2.t7 -o glcic.onnx
    glcic-fast export --weights model_cn --config config.json -o glcic-fp16.onnx --dtype float16
    glcic-fast export --weights glcic.safetensors -o glcic-512.onnx --fixed 512x512

Exit status: 0 written, 2 usage or input errors (one line on stderr, nothing written).
"""

import argparse

from glcic_fast.cli.common import UsageError

DESCRIPTION = ("Write the completion network (BatchNorm folded, standard ONNX operators only) to an ONNX file, "
               "with the input convention, mean pixel, block order and weights' source in its metadata. Input "
               "N x 4 x H x W, output N x 3 x H x W; N, H and W are free (H and W multiples of 4) unless --fixed. "
               "Exit status: 0 written, 2 usage or input errors.")


def _parse_size(text: str):
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 512x512, got {text!r}")
    return height, width


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--weights", required=True, metavar="PATH", help="trained weights: anything glcic_fast.load reads")
    p.add_argument("--config", metavar="JSON", help="GLCIC-PyTorch's config.json (default: beside --weights)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the ONNX file (replaced if it exists)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="the file's precision, input and output included (default float32)")
    p.add_argument("--fixed", type=_parse_size, metavar="HxW",
                   help="fix the input to N x 4 x H x W (N from --batch), for engines that want one shape "
                        "(default: N, H and W free)")
    p.add_argument("--batch", type=int, help="the batch size N of a --fixed file (default 1)")


def run(args):
    if not args.output.lower().endswith(".onnx"):
        raise UsageError(f"-o names the ONNX file to write: end it in .onnx, got {args.output}")
    if args.batch is not None and args.fixed is None:
        raise UsageError("--batch sets the batch size of a --fixed file; without --fixed the batch is free")
    batch = 1 if args.batch is None else args.batch

    from glcic_fast.inference.export import export_onnx
    from glcic_fast.nn.weights import WeightsError, load

    try:
        net = load(args.weights, args.config)
    except WeightsError as exc:  # its message may quote a multi-line one of torch.load's
        raise UsageError(f"cannot load weights {args.weights}: {' '.join(str(exc).split())}")
    try:
        metadata = export_onnx(net, args.output, dtype=args.dtype, dynamic=args.fixed is None,
                               shape=None if args.fixed is None else (batch, *args.fixed))
    except (ImportError, ValueError) as exc:
        raise UsageError(str(exc))
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}")
    shape = "N x 4 x H x W" if args.fixed is None else metadata["shape"].replace("x", " x ")
    print(f"wrote {args.output}: {metadata['dtype']}, input {shape}, {metadata['input_convention']}, "
          f"{metadata['block_order']}, weights {metadata['weights_source']}")
    return 0
