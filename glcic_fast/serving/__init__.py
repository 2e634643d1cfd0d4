"""The HTTP service: ``POST /v1/complete`` over the throughput engine
(:mod:`glcic_fast.inference.engine`), health and readiness, Prometheus metrics
(``app``), and the same app as a Ray Serve deployment (``ray_app``). Needs the ``serve``
extra: ``pip install glcic_fast[serve]``."""
