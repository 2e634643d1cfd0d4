"""What the commands share: the usage error, the device and the output-extension checks.
Heavy modules are imported inside the functions, so that ``glcic-fast --help`` stays quick."""


class UsageError(Exception):
    """Bad arguments or inputs: reported in one message, exit status 2, nothing written."""


def image_extensions():
    from glcic_fast.imageio import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def check_writable_extension(path):
    from glcic_fast.imageio import check_writable

    if not path.lower().endswith(image_extensions()):
        raise UsageError(f"cannot write an image to {path}: use an image extension such as .png or .jpg")
    try:
        check_writable(path, channels=3)
    except ValueError as exc:
        raise UsageError(str(exc))


def pick_device(args, world, local_rank):
    """The device ``--device`` names (default: glcic_fast.devices.default_device's), checked;
    under torchrun with several processes (``world`` > 1), this process's GPU, made the
    current CUDA device."""
    import torch

    from glcic_fast.devices import default_device

    if world > 1:
        if args.device not in (None, "cuda"):
            raise UsageError(f"under torchrun each process uses cuda:LOCAL_RANK; --device {args.device} is not allowed")
        if not torch.cuda.is_available():
            raise UsageError("torchrun with several processes needs CUDA GPUs (one per process)")
        if not 0 <= local_rank < torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             "GPU(s): start at most one process per GPU (torchrun --nproc-per-node)")
    try:
        device = default_device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"bad --device {args.device!r}: {exc}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if world > 1:
            # The process's current device too, so that nothing lands on cuda:0 by default
            # (an extra CUDA context there per process) and Triton launches on this GPU.
            torch.cuda.set_device(device)
    return device
