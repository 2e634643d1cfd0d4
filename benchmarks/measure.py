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


def macs_performed(net, x) -> int:
    """Multiply-accumulates ``net`` (a CompletionNet) performs on input ``x``, per its
    dispatcher's choice of backend per layer: the Winograd layers ("cpp") at their reduced
    count, the others as direct convolution."""
    from glcic_fast.nn.architecture import layer_macs, layer_output_sizes
    from glcic_fast.ops import winograd

    chosen = net.layer_backends(x)
    batch, _, height, width = x.shape
    total = 0
    for spec, h, w in layer_output_sizes(height, width):
        if chosen[spec.name][0] == "cpp":
            total += winograd.multiplies(h, w, spec.in_channels, spec.out_channels, spec.dilation)
        else:
            total += layer_macs(spec, h, w)
    return total * batch


def layer_sides(size: int):
    """(spec, input side, output side) of each layer of the completion net on a size x size image."""
    from glcic_fast.nn.architecture import layer_output_sizes

    outputs = layer_output_sizes(size, size)
    inputs = [size] + [h for _, h, _ in outputs[:-1]]
    return [(spec, side, out) for (spec, out, _), side in zip(outputs, inputs)]
