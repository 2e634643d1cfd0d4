"""The one place that decides which backend runs a fused op.

Backends register an implementation per op together with a ``why_not`` check that returns
``None`` when the implementation can run the given arguments, or a sentence saying why
not. ``backend=None`` walks the automatic order for the tensor's device and takes the
first implementation that can run (quietly falling back); a backend named by the caller
(or by ``GLCIC_FAST_BACKEND``) that cannot run raises :class:`BackendUnavailable`.
``explain`` says what would be chosen and why the others were passed over.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

#: torch: plain PyTorch; cpp: the C++ CPU twins in glcic_fast._C; triton: glcic_fast.kernels
#: (kernels/); cuda: the CUDA kernels in glcic_fast._C.
BACKENDS = ("torch", "cpp", "triton", "cuda")

# Without a tuning entry, the order tried on each device type. Triton runs on the CPU only
# through its interpreter, which is for tests: it is used there only when named.
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run the given arguments."""


@dataclass(frozen=True)
class Implementation:
    run: Callable
    #: None: runs any arguments the op accepts.
    why_not: Optional[Callable[..., Optional[str]]]
    #: False: taken automatically only where the tuning table (measured on a GPU) names it.
    automatic: bool = True
    #: Asked at each automatic choice: why not to take it automatically now (it still runs
    #: when named), or None.
    why_not_automatic: Optional[Callable[[], Optional[str]]] = None


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
_TUNING: Optional[dict] = None
#: Why an optional backend could not be loaded (glcic_fast.ops.BACKEND_LOAD_ERRORS), quoted
#: when it is asked for by name.
LOAD_ERRORS: Dict[str, str] = {}


def record_load_error(module: str, exc: BaseException, *backends: str):
    """``module``, which ``backends`` need, did not import. An optional backend must never
    break the import of the package: the ops then run without it, and say why."""
    for backend in backends:
        LOAD_ERRORS.setdefault(backend, f"{module} did not load: {type(exc).__name__}: {exc}")


def register(op: str, backend: str, run: Callable, why_not: Optional[Callable[..., Optional[str]]] = None, *,
             automatic: bool = True, why_not_automatic: Optional[Callable[[], Optional[str]]] = None):
    """Make ``backend`` able to run ``op`` (``why_not=None``: whatever arguments the op
    accepts). ``automatic=False`` keeps it out of the automatic choice unless the tuning
    table names it for the shape: for kernels that cover only some shapes and must earn
    their place by a measurement. ``why_not_automatic``, asked at each automatic choice,
    keeps it out while it returns a reason (for what can change while the process runs)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(run, why_not, automatic, why_not_automatic)


def _tuning_table() -> dict:
    """Per-op, per-shape backend choices measured on a GPU (tuning.json beside this file,
    or the file named by GLCIC_FAST_TUNING)."""
    global _TUNING
    if _TUNING is None:
        path = os.environ.get("GLCIC_FAST_TUNING") or os.path.join(os.path.dirname(__file__), "tuning.json")
        _TUNING = {}
        if os.path.exists(path):
            with open(path) as f:
                _TUNING = json.load(f)
    return _TUNING


def _preferred(op: str, device: torch.device, tuning_key: Optional[str]) -> Optional[str]:
    if device.type != "cuda" or not tuning_key:
        return None
    return _tuning_table().get(op, {}).get(tuning_key)


def _order(op: str, device: torch.device, tuning_key: Optional[str]) -> Tuple[str, ...]:
    order = _DEFAULT_ORDER.get(device.type, ("torch",))
    preferred = _preferred(op, device, tuning_key)
    if preferred:
        order = (preferred,) + tuple(b for b in order if b != preferred)
    return order


def explain(op: str, device: torch.device, *args, backend: Optional[str] = None,
            tuning_key: Optional[str] = None, **kwargs) -> Tuple[Optional[str], List[str]]:
    """(chosen backend or None, one line for each backend tried and passed over)."""
    impls = _REGISTRY.get(op, {})
    requested = backend or os.environ.get("GLCIC_FAST_BACKEND") or None
    names = (requested,) if requested else _order(op, device, tuning_key)
    skipped = []
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
        impl = impls.get(name)
        if impl is None:
            if not requested:  # the automatic order lists backends that only some ops have
                continue
            reason = LOAD_ERRORS.get(name, "not implemented for this op")
        else:
            reason = impl.why_not(*args, **kwargs) if impl.why_not is not None else None
            if reason is None and not requested:
                if not impl.automatic and _preferred(op, device, tuning_key) != name:
                    reason = "taken automatically only where the tuning table measured it fastest"
                elif impl.why_not_automatic is not None:
                    reason = impl.why_not_automatic()
        if reason is None:
            return name, skipped
        skipped.append(f"{name}: {reason}")
    return None, skipped


def resolve(op: str, device: torch.device, *args, backend: Optional[str] = None,
            tuning_key: Optional[str] = None, **kwargs) -> Tuple[str, Callable]:
    name, skipped = explain(op, device, *args, backend=backend, tuning_key=tuning_key, **kwargs)
    if name is None:
        raise BackendUnavailable(f"{op}: no backend can run these arguments ({'; '.join(skipped)})")
    return name, _REGISTRY[op][name].run


def available_backends(op: str) -> List[str]:
    """Backends with an implementation registered for ``op`` in this installation."""
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {})]
