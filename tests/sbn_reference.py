"""An independent float64 numpy implementation of SBN as docs/sbn.md defines it.

It does not import the library. The DFT is written with real cosine/sine matrices so every step is
a real-analytic expression: evaluated at x + i*h*v it gives directional derivatives by the complex
step (Im f(x + i h v) / h), exact to rounding, with no finite-difference error.
"""

from __future__ import annotations

import numpy as np


def _dft_parts(n: int):
    k = np.arange(n)
    ang = 2 * np.pi * np.outer(k, k) / n
    scale = 1 / np.sqrt(n)
    return np.cos(ang) * scale, -np.sin(ang) * scale  # F = A + iB (ortho)


def dft2(x):
    """Orthonormal 2-D DFT over the last two axes; returns (real, imag)."""
    a, b = _dft_parts(x.shape[-2])
    p, q = _dft_parts(x.shape[-1])
    # X = (A + iB) x (P + iQ)^T, with A, B, P, Q symmetric
    ax, bx = a @ x, b @ x
    return ax @ p - bx @ q, ax @ q + bx @ p


def idft2_real(yr, yi):
    """Real part of the orthonormal inverse 2-D DFT of Y = yr + i*yi."""
    a, b = _dft_parts(yr.shape[-2])
    p, q = _dft_parts(yr.shape[-1])
    u = a @ yr + b @ yi
    v = a @ yi - b @ yr
    return u @ p + v @ q


def sbn(x, gamma, beta, eps, stats, mean=None, var=None):
    """Returns (y, mean_stat, var_stat).

    Training (mean is None): batch statistics; mean_stat is the channel mean (C,) in channel mode
    and the inverse DFT of the per-frequency mean (the spatial mean image, (C, H, W)) in frequency
    mode; var_stat is the biased batch variance. Eval: the given statistics, in the same forms.
    """
    xr, xi = dft2(x)
    axes = (0, 2, 3) if stats == "channel" else (0,)
    if mean is None:
        mr, mi = xr.mean(axis=axes, keepdims=True), xi.mean(axis=axes, keepdims=True)
        v = ((xr - mr) ** 2 + (xi - mi) ** 2).mean(axis=axes, keepdims=True)
        if stats == "channel":
            mean_stat = mr.reshape(-1)  # the imaginary part is zero for real input
            var_stat = v.reshape(-1)
        else:
            mean_stat = idft2_real(mr[0], mi[0])
            var_stat = v[0]
    else:
        if stats == "channel":
            mr = mean.reshape(1, -1, 1, 1)
            mi = np.zeros_like(mr)
            v = var.reshape(1, -1, 1, 1)
        else:
            fr, fi = dft2(mean)
            mr, mi = fr[None], fi[None]
            v = var[None]
        mean_stat, var_stat = mean, var
    s = gamma.reshape(1, -1, 1, 1) / np.sqrt(v + eps)
    yr = (xr - mr) * s + beta.reshape(1, -1, 1, 1)
    yi = (xi - mi) * s
    return idft2_real(yr, yi), mean_stat, var_stat


def complex_step_grad(fn, arr, h=1e-30):
    """Gradient of the real scalar fn(arr) by the complex step, one coordinate at a time."""
    arr = np.asarray(arr, dtype=np.complex128)
    grad = np.zeros(arr.shape)
    flat = arr.reshape(-1)
    for i in range(flat.size):
        pert = flat.copy()
        pert[i] += 1j * h
        grad.reshape(-1)[i] = np.imag(fn(pert.reshape(arr.shape))) / h
    return grad


def directional(fn, x, v, h=1e-30):
    """d/dt fn(x + t v) at t=0 by the complex step (fn real-analytic, numpy): one directional
    derivative where :func:`complex_step_grad` takes one coordinate at a time."""
    return np.imag(fn(x + 1j * h * v)) / h
