"""The service as a Ray Serve application: the same FastAPI app (:func:`create_app`, the same
engine) in every replica, one replica per GPU where the cluster has GPUs.

    serve run glcic_fast.serving.ray_app:build weights=/shared/w.safetensors max_replicas=4
    glcic-fast serve --ray --weights /shared/w.safetensors          # the same, from the CLI

Arguments (``serve run ... key=value``): ``weights`` (required, or ``random_weights=true``;
a path every node can read), the :class:`ServiceConfig` fields (``device``, ``dtype``,
``max_batch``, ``max_wait_ms``, ``max_pixels``, ``max_body_bytes``, ``max_queue``,
``min_fill``) and the scaling settings:

- ``num_gpus`` per replica: default 1 when there are GPUs (so Ray places one replica per
  GPU and sets its CUDA_VISIBLE_DEVICES), else 0 (``num_cpus`` then, default 1).
- ``min_replicas`` (default 1), ``max_replicas`` (default: the GPUs, at least 1; the
  cluster's with ``glcic-fast serve --ray``, the machine's under ``serve run``, which builds
  the application before it connects to Ray):
  Ray Serve's autoscaler adds a replica while the replicas average more than
  ``target_ongoing_requests`` requests each (default ``2 * max_batch``: a batch running and
  one filling) and removes one below it; ``max_ongoing_requests`` per replica is
  ``max_queue`` (the proxy queues or refuses past it, the app refuses with 503 too).
- ``graceful_shutdown_timeout_s`` (default 120): how long a replica being stopped answers
  what it holds before it is killed.
"""

from typing import Optional

from ray import serve

from glcic_fast.serving.app import ServiceConfig, create_app

#: The deployment's name in Ray Serve.
NAME = "glcic_fast"
_CONFIG_FIELDS = tuple(ServiceConfig.__dataclass_fields__)
_SCALING = ("num_gpus", "num_cpus", "min_replicas", "max_replicas", "target_ongoing_requests",
            "graceful_shutdown_timeout_s")
_TRUE = ("true", "1", "yes", "on")


@serve.ingress()
class CompletionService:
    """One replica: the net loaded on the replica's device, the app built around it."""

    def __init__(self, weights: str, config: dict):
        self.weights, self.config = weights, ServiceConfig(**config)

    def __serve_build_asgi_app__(self):
        from glcic_fast.inference.api import get_net

        net = get_net(self.weights, self.config.device, self.config.dtype)
        return create_app(net, self.config)


#: The type of each ``serve run`` argument (they arrive as strings); the rest are strings.
_TYPES = {"max_batch": int, "max_pixels": int, "max_body_bytes": int, "max_queue": int, "max_wait_ms": float,
          "min_fill": float, "num_gpus": float, "num_cpus": float, "min_replicas": int, "max_replicas": int,
          "target_ongoing_requests": float, "graceful_shutdown_timeout_s": float}


def _typed(name: str, value):
    convert = _TYPES.get(name, str)
    try:
        return convert(value)
    except ValueError:
        raise ValueError(f"{name}: expected {convert.__name__}, got {value!r}") from None


def application(weights: str, config: ServiceConfig, *, num_gpus: Optional[float] = None,
                num_cpus: Optional[float] = None, min_replicas: int = 1, max_replicas: Optional[int] = None,
                target_ongoing_requests: Optional[float] = None, graceful_shutdown_timeout_s: float = 120):
    """The bound application (``serve.run`` takes it). Where ``num_gpus`` or ``max_replicas``
    is not given, counts the GPUs: the cluster's once Ray is initialised (``glcic-fast serve
    --ray``), else this machine's (``serve run`` builds the application before it connects)."""
    import ray
    import torch

    gpus = 0
    if num_gpus is None or max_replicas is None:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()
    if num_gpus is None:
        num_gpus = 1 if gpus else 0
    if max_replicas is None:
        max_replicas = max(1, gpus)
    if min_replicas < 1 or max_replicas < min_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}")
    actor = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": num_cpus or 1}
    deployment = serve.deployment(CompletionService).options(
        name=NAME, ray_actor_options=actor, max_ongoing_requests=config.max_queue,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target_ongoing_requests or 2 * config.max_batch})
    return deployment.bind(weights, config.as_dict())


def build(args: dict):
    """``serve run glcic_fast.serving.ray_app:build weights=... [key=value ...]``."""
    args = dict(args)
    random_weights = str(args.pop("random_weights", "false")).lower() in _TRUE
    weights = args.pop("weights", None)
    if random_weights:
        weights = "random"
    elif not weights:
        raise ValueError("no weights: pass weights=<path every node can read> (or random_weights=true for a "
                         "randomly initialised net, whose output is noise)")
    unknown = sorted(set(args) - set(_CONFIG_FIELDS) - set(_SCALING))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: "
                         f"{', '.join(('weights', 'random_weights') + _CONFIG_FIELDS + _SCALING)}")
    config = ServiceConfig(**{k: _typed(k, v) for k, v in args.items() if k in _CONFIG_FIELDS})
    return application(weights, config, **{k: _typed(k, v) for k, v in args.items() if k in _SCALING})
