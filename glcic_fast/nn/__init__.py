"""The networks as modules: the layer table (``architecture``), the plain-PyTorch reference
(``reference``, the parity oracle), the fast ``CompletionNet``, the training discriminator,
and the state dicts and weight files users hold (``state_dict``, ``weights``).

Beneath it: ``glcic_fast.ops`` (the fused layer ops). Above it: ``glcic_fast.inference``
and ``glcic_fast.training``.
"""
