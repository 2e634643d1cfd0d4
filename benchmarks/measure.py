"""What every benchmark records beside its timings: the device and versions it ran on, and
calls timed to the end of their device work. A plain module (not conftest.py) so that the
benchmark files import it by name: a test folder may have a conftest.py of its own.
"""

import platform

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance() -> dict:
    info = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def synchronized(fn):
    """Device work is asynchronous: a timed call must end when the GPU is done."""
    if not torch.cuda.is_available():
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def layer_macs_performed(spec, out_height: int, out_width: int, backend: str) -> int:
    """Multiply-accumulates ``backend`` performs for one layer per image: the Winograd kernel
    ("cpp") its reduced count, the others direct convolution's."""
    from glcic_fast.nn.architecture import layer_macs
    from glcic_fast.ops import winograd

    if backend == "cpp":
        return winograd.multiplies(out_height, out_width, spec.in_channels, spec.out_channels, spec.dilation)
    return layer_macs(spec, out_height, out_width)


def macs_performed(net, x) -> int:
    """Multiply-accumulates ``net`` (a CompletionNet) performs on input ``x``, per its
    dispatcher's choice of backend per layer."""
    from glcic_fast.nn.architecture import layer_output_sizes

    chosen = net.layer_backends(x)
    batch, _, height, width = x.shape
    return batch * sum(layer_macs_performed(spec, h, w, chosen[spec.name][0])
                       for spec, h, w in layer_output_sizes(height, width))


def layer_sides(size: int):
    """(spec, input side, output side) of each layer of the completion net on a size x size image."""
    from glcic_fast.nn.architecture import layer_output_sizes

    outputs = layer_output_sizes(size, size)
    inputs = [size] + [h for _, h, _ in outputs[:-1]]
    return [(spec, side, out) for (spec, out, _), side in zip(outputs, inputs)]
