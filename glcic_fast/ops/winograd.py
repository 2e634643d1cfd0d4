"""Winograd minimal filtering F(m x m, 3 x 3) (Lavin & Gray, 2016), the arithmetic behind
backend "cpp" of ``conv2d_bias_act`` (the CPU kernel in csrc/ops/cpu/conv2d_bias_act_kernel.cpp).

A tile of m x m outputs of a 3x3 correlation is computed from the (m + 2) x (m + 2) input
patch d around it as

    Y = AT [ (G w G^T) .* (BT d BT^T) ] AT^T       (the products summed over input channels)

which takes (m + 2)^2 multiplies per tile and channel pair where direct convolution takes
9 m^2: 2.25x fewer for m = 2, 4x for m = 4, 5.06x for m = 6. The matrices come from the
Cook-Toom construction on the interpolation points ``POINTS[m]`` plus the point at infinity,
computed here in float64; the filter's transform G w G^T is made once per weight (and
cached by the caller), in float64, and rounded once to float32.

The larger m, the larger the transforms' coefficients and the rounding error in float32.
Max |error| / max |output| of a 256 -> 256 layer against float64 (README, "Winograd on
the CPU"; benchmarks/bench_winograd_tile.py): direct float32 convolution (oneDNN) 1.9e-6;
m = 2 7.2e-7, m = 4 1.8e-5, m = 6 2.5e-5.
``TILE`` is the m the backend uses.
"""

import numpy as np
import torch

#: Interpolation points per m (m + 1 finite points; the point at infinity is implied). Small
#: integers and halves keep the transforms' coefficients small and exact in float32.
POINTS = {2: (0.0, 1.0, -1.0), 4: (0.0, 1.0, -1.0, 2.0, -2.0), 6: (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)}

#: The m of backend "cpp": F(4 x 4, 3 x 3). On the 2-core Zen 5 development machine the whole
#: net at 512^2 took 452, 375 and 428 ms with m = 2, 4 and 6 (bench_winograd_tile.py,
#: README), and m = 4's output stays far inside the network's 1e-4 budget (3.2e-6 from
#: float64); m = 6's transforms cost more, and its 8 x 8 tiles waste work on the
#: dilation-16 layer's 8 x 8 sub-grids.
TILE = 4

#: Output channels are grouped in panels of this many (the kernel's kChannelRun): the
#: transformed weight is (alpha^2, Cout / PANEL, Cin, PANEL). Cin and Cout must be multiples.
PANEL = 16


def _cook_toom(m: int):
    """(AT, G, BT) of F(m x m, 3 x 3) as float64 numpy arrays."""
    points = np.asarray(POINTS[m])
    alpha, r = m + 2, 3
    at, g, bt = np.zeros((m, alpha)), np.zeros((alpha, r)), np.zeros((alpha, alpha))
    poly = np.polynomial.polynomial
    for j, p in enumerate(points):
        others = np.delete(points, j)
        at[:, j] = p ** np.arange(m)                               # evaluate the product at p
        g[j] = p ** np.arange(r) / np.prod(p - others)             # the filter, Lagrange-weighted
        bt[j, :alpha - 1] = poly.polyfromroots(others)             # the data, by the cofactor
    at[m - 1, alpha - 1] = g[alpha - 1, r - 1] = 1.0               # the point at infinity:
    bt[alpha - 1] = poly.polyfromroots(points)                     # leading coefficients only
    return at, g, bt


# Made once at import, as tensors: torch.compile then traces only torch code.
_MATRICES = {m: tuple(torch.from_numpy(a) for a in _cook_toom(m)) for m in POINTS}
_G_ENTRIES = {m: g.tolist() for m, (_, g, _) in _MATRICES.items()}
_KERNEL_MATRICES = {m: (bt.float().contiguous(), at.float().contiguous()) for m, (at, _, bt) in _MATRICES.items()}


def _check(m: int):
    if m not in POINTS:
        raise ValueError(f"F(m x m, 3 x 3) is built here for m in {sorted(POINTS)}, got m={m}")


def matrices(m: int):
    """(AT, G, BT) of F(m x m, 3 x 3) as float64 CPU tensors: AT is m x alpha, G alpha x 3,
    BT alpha x alpha, alpha = m + 2."""
    _check(m)
    return _MATRICES[m]


def kernel_matrices(m: int):
    """(BT, AT) as contiguous float32 CPU tensors, as the kernel takes them."""
    _check(m)
    return _KERNEL_MATRICES[m]


def transform_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> G w G^T in the kernel's layout (alpha^2, Cout / PANEL, Cin, PANEL),
    computed in float64 and rounded once to float32."""
    _check(m)
    cout, cin = weight.shape[:2]
    # G made here from numbers, not taken from _MATRICES: traced by torch.compile, a tensor
    # made inside the function is a constant of the graph and a module-level one an input,
    # so the transform depends on the weight alone and Inductor's freezing folds it.
    g = torch.tensor(_G_ENTRIES[m], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g)     # alpha, alpha, Cin, Cout
    alpha = m + 2
    u = u.reshape(alpha * alpha, cin, cout // PANEL, PANEL).permute(0, 2, 1, 3)
    return u.to(torch.float32).contiguous()


def tile_count(height: int, width: int, dilation: int, m: int = TILE) -> int:
    """Tiles the kernel runs for one H x W image: each of the dilation^2 sub-grids cut into
    m x m tiles (partial ones at its far edges)."""
    def ceil_div(a, b):
        return -(-a // b)

    def per_axis(size):
        return sum(ceil_div(ceil_div(size - start, dilation), m) for start in range(min(dilation, size)))

    return per_axis(height) * per_axis(width)


def multiplies(height: int, width: int, cin: int, cout: int, dilation: int, m: int = TILE) -> int:
    """Multiply-accumulates the kernel performs for one H x W image: alpha^2 per tile and
    channel pair, against 9 per output pixel and channel pair for direct convolution."""
    return tile_count(height, width, dilation, m) * (m + 2) ** 2 * cin * cout
