"""Frequency-mode SBN without torch.fft: the real 2-D DFT as two small dense matrix products.

For the small maps of deep stages (4x4 to 28x28) ``torch.fft``'s per-call overhead and complex
intermediates cost more than the transform itself. Here the one-sided orthonormal spectrum of a
real (H, W) map is ``rfft`` along W by one matrix product with a (W, 2W') real matrix
(W' = W // 2 + 1, real and imaginary parts side by side), then the complex DFT along H by one
product with a (2H, 2H) real matrix. The inverse is the same two steps backwards and equals
``irfft2``: bins 1..W'-1 (but not W/2) carry Hermitian weight 2. The matrices are ``torch.fft``
applied to identity matrices, so they are the reference's own transforms.

Spectra are held as real tensors of shape (B, W', 2, H): [b, v, 0, u] = Re X(u, v) and
[b, v, 1, u] = Im X(u, v). Every statistic is per frequency and |X(k)| = |X(-k)| for real input,
so the one-sided spectrum carries the full spectrum's statistics (docs/sbn.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import _stat_dtype
from .spectral import _hermitian_full, frequency_scale

__all__: list[str] = []  # package-private: see sbn_surgery.layers

#: Maps with at most this many pixels take the transform as ONE dense (HW, 2HW') matrix product
#: (no transposes; a GEMM with a long inner dimension); larger ones the two separable products.
#: On CPU (see checks.AUTO_MATMUL_MAX_SIDE for the command) the dense form's CPU time over
#: BatchNorm2d's was 5.8x against the separable form's 9.9x at 7x7, 6.1x against 8.6x at 10x10,
#: but 9.9x against 8.5x at 14x14.
DENSE_MAX_PIXELS = 100

_MATS: dict[tuple, tuple] = {}


def _separable_mats(h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """(aw, m, bw) in float64: rfft along W (W, 2W'), the complex DFT along H on stacked
    [re, im] (2H, 2H), irfft along W (2W', W); orthonormal."""
    wr = w // 2 + 1
    fw = torch.fft.rfft(torch.eye(w, dtype=torch.float64), norm="ortho")  # (W, W')
    aw = torch.cat([fw.real, fw.imag], dim=1)
    fh = torch.fft.fft(torch.eye(h, dtype=torch.float64), norm="ortho")  # symmetric
    ch, sh = fh.real, -fh.imag  # F_H = ch - i sh
    # [re, im] (a row per column v) @ m = [ch re + sh im, ch im - sh re] = F_H (re + i im)
    m = torch.cat([torch.cat([ch, -sh], 1), torch.cat([sh, ch], 1)], 0)
    unit = torch.eye(wr, dtype=torch.complex128)
    bw = torch.cat([torch.fft.irfft(unit, n=w, norm="ortho"),
                    torch.fft.irfft(1j * unit, n=w, norm="ortho")], dim=0)
    return aw, m, bw


def _dft_mats(h: int, w: int, dtype: torch.dtype, device: torch.device):
    """The transform's matrices for (H, W), cached per size, dtype and device: (aw, m, bw, None,
    None) for the separable form, (None, None, None, kf, ki) for the dense one, whose (HW, 2HW')
    and (2HW', HW) matrices are the separable transforms of identity matrices."""
    key = (h, w, dtype, str(device))
    # While torch.compile / torch.export trace, build them in the graph: a cached tensor made
    # during tracing would be a fake one.
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    mats = None if tracing else _MATS.get(key)
    if mats is None:
        sep = _separable_mats(h, w)
        if h * w <= DENSE_MAX_PIXELS:
            wr = w // 2 + 1
            eye = torch.eye(h * w, dtype=torch.float64).view(h * w, h, w)
            kf = _rdft2(eye, sep + (None, None)).reshape(h * w, 2 * h * wr)
            unit = torch.eye(2 * h * wr, dtype=torch.float64).view(-1, wr, 2, h)
            ki = _irdft2(unit, sep + (None, None)).reshape(2 * h * wr, h * w)
            mats = (None, None, None, kf, ki)
        else:
            mats = sep + (None, None)
        mats = tuple(None if t is None else t.to(device=device, dtype=dtype).contiguous()
                     for t in mats)
        if not tracing:
            _MATS[key] = mats
    return mats


def _rdft2(d: Tensor, mats) -> Tensor:
    """(B, H, W) real -> one-sided orthonormal spectrum, (B, W', 2, H)."""
    aw, m, _, kf, _ = mats
    b, h, w = d.shape
    wr = w // 2 + 1
    if kf is not None:
        return (d.reshape(b, h * w) @ kf).view(b, wr, 2, h)
    t = (d.reshape(b * h, w) @ aw).view(b, h, 2, wr)
    t = t.permute(0, 3, 2, 1).reshape(b * wr, 2 * h)
    return (t @ m).view(b, wr, 2, h)


def _irdft2(z: Tensor, mats) -> Tensor:
    """(B, W', 2, H) one-sided spectrum -> Re of its orthonormal inverse DFT, (B, H, W)."""
    _, m, bw, _, ki = mats
    b, wr, _, h = z.shape
    if ki is not None:
        return (z.reshape(b, 2 * wr * h) @ ki).view(b, h, ki.shape[1] // h)
    w = bw.shape[1]
    a = (z.reshape(b * wr, 2 * h) @ m.t()).view(b, wr, 2, h)
    a = a.permute(0, 3, 2, 1).reshape(b * h, 2 * wr)
    return (a @ bw).view(b, h, w)


def _hermitian_weights(wr: int, w: int, like: Tensor) -> Tensor:
    """Weight of each one-sided column v in a full-spectrum sum: 2, but 1 at v=0 and v=W/2."""
    wts = torch.full((wr, 1), 2.0, dtype=like.dtype, device=like.device)
    wts[0] = 1.0
    if w % 2 == 0:
        wts[-1] = 1.0
    return wts


def _pairs(t: Tensor) -> Tensor:
    """A per-bin (C, W', H) tensor laid out as one sample of a spectrum, (1, C, W', 2, H), and
    contiguous: multiplying by it broadcasts over the batch only, the fast case."""
    c, wr, h = t.shape
    return t.unsqueeze(1).expand(c, 2, wr, h).transpose(1, 2).reshape(1, c, wr, 2, h)


class _FrequencySBNTrain(torch.autograd.Function):
    """Training-mode frequency SBN with batch statistics, by matmul DFT; hand-written backward.

    With d = x - E_n[x], Z = DFT(d), var = E_n|Z|^2, r = rsqrt(var + eps), s = gamma * r:
    y = IDFT(Z * s) + sqrt(HW) * beta at pixel (0, 0). Backward, with G = DFT(g - E_n[g]) and
    p = E_n Re(G conj Z): dx = IDFT(s * (G - r^2 p Z)), dgamma = sum over the full spectrum of
    r * n * p, dbeta = sqrt(HW) * sum_n g(0, 0)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):  # type: ignore[override]
        n, c, h, w = x.shape
        sd = _stat_dtype(x)
        wr = w // 2 + 1
        mats = _dft_mats(h, w, sd, x.device)
        xs = x.to(sd).contiguous()
        mean = xs.mean(0)
        # Centre before the transform: X - mu is the DFT of x - mean, with no cancellation.
        z = _rdft2((xs - mean).view(n * c, h, w), mats).view(n, c, wr, 2, h)
        var = z.square().sum(0).sum(2).div_(n)  # (C, W', H)
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(sd).view(c, 1, 1) * rstd
        y = _irdft2((z * _pairs(scale)).view(n * c, wr, 2, h), mats).view(n, c, h, w)
        y[:, :, 0, 0] += math.sqrt(h * w) * bias.to(sd)
        ctx.save_for_backward(z, rstd, scale)
        ctx.param_dtype = weight.dtype
        var_full = _hermitian_full(var.transpose(-1, -2), w).contiguous()
        ctx.mark_non_differentiable(mean, var_full)
        # y is a view of the last matrix product; autograd forbids modifying a custom Function's
        # view output in place (as a residual `x += shortcut` does), and detach() is no view.
        return y.to(x.dtype).detach(), mean, var_full

    @staticmethod
    def backward(ctx, gy: Tensor, _gmean, _gvar):  # type: ignore[override]
        z, rstd, scale = ctx.saved_tensors
        n, c, wr, _, h = z.shape
        sd = z.dtype
        w = gy.shape[-1]
        mats = _dft_mats(h, w, sd, z.device)
        g = gy.to(sd).contiguous()
        grad_x = grad_w = grad_b = None
        need_p = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if need_p:
            gz = _rdft2((g - g.mean(0)).view(n * c, h, w), mats).view(n, c, wr, 2, h)
            p = (gz * z).sum(0).sum(2).div_(n)  # E_n Re(G conj Z), (C, W', H)
        if ctx.needs_input_grad[1]:
            wts = _hermitian_weights(wr, w, p)
            grad_w = (p * rstd * wts).sum(dim=(1, 2)).mul_(n).to(ctx.param_dtype)
        if ctx.needs_input_grad[0]:
            gz.mul_(_pairs(scale)).addcmul_(z, _pairs(-scale * rstd * rstd * p))
            grad_x = _irdft2(gz.view(n * c, wr, 2, h), mats).view(n, c, h, w).to(gy.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g[:, :, 0, 0].sum(0).mul_(math.sqrt(h * w)).to(ctx.param_dtype)
        return grad_x, grad_w, grad_b, None


def _frequency_matmul_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """Returns (y, spatial_mean, full_var), as ``_frequency_fft`` does."""
    return _FrequencySBNTrain.apply(x, weight, bias, eps)


def _frequency_matmul_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                           eps: float) -> Tensor:
    """Frequency SBN with given (running) statistics: a per-channel circular filter of x - mean
    plus a one-pixel constant; differentiable through autograd (it is linear in x)."""
    n, c, h, w = x.shape
    sd = _stat_dtype(x)
    wr = w // 2 + 1
    mats = _dft_mats(h, w, sd, x.device)
    scale = frequency_scale(var.to(sd), weight.to(sd), eps)[..., :wr].transpose(-1, -2)
    d = (x.to(sd) - mean.to(sd)).contiguous()
    z = _rdft2(d.view(n * c, h, w), mats).view(n, c, wr, 2, h) * _pairs(scale)
    y = _irdft2(z.view(n * c, wr, 2, h), mats).view(n, c, h, w)
    corner = torch.zeros(h, w, dtype=sd, device=x.device)
    corner[0, 0] = math.sqrt(h * w)
    y = y + bias.to(sd).view(1, c, 1, 1) * corner
    return y.to(x.dtype)
