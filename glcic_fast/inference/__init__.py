"""Completing images with a trained network: one image (``completion``: any size, only the
holes replaced, region-of-interest and tiled inference), post-processing, many images at
once (``engine``: the ROI crops of concurrent images batched, for the service and the
folder command through ``batching``), the one-call ``complete`` (``api``), hole masks from
mask files and rectangles (``masks``), ONNX export (``export``), and the timing and quality
comparisons behind ``glcic-fast bench`` and the demo card."""
