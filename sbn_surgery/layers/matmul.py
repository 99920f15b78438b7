"""Frequency-mode SBN without torch.fft: the real 2-D DFT as dense matrix products.

For the small maps of deep stages (4x4 to 28x28) ``torch.fft``'s per-call overhead and complex
intermediates cost more than the transform itself. Two forms, both in real arithmetic:

- dense (maps up to ``DENSE_MAX_PIXELS``): one product with a real orthogonal (HW, HW) matrix
  whose columns are the cosine and sine parts of the spectrum (``_real_basis``), its transpose
  for the inverse;
- separable: ``rfft`` along W by one product with a (2W', W) real matrix (W' = W // 2 + 1, real
  parts then imaginary parts), then the complex DFT along H by products with a (2H, 2H) real
  matrix. The inverse is the same steps backwards and equals ``irfft2``: bins 1..W'-1 (but not
  W/2) carry Hermitian weight 2. Spectra are real tensors (W', N, C, 2, H): [v, n, c, 0, u] =
  Re X(u, v), [v, n, c, 1, u] = Im X(u, v).

The matrices are ``torch.fft`` applied to identity matrices, so they are the reference's own
transforms. Every statistic is per frequency and |X(k)| = |X(-k)| for real input, so half the
spectrum carries the full spectrum's statistics (docs/sbn.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import _stat_dtype
from .spectral import _hermitian_full, frequency_scale

__all__: list[str] = []  # package-private: see sbn_surgery.layers

#: Maps with at most this many pixels take the dense form: the transform is ONE (HW, HW)
#: orthogonal matrix product over all N*C maps (see ``_real_basis``), no transposes and no
#: complex arithmetic; larger maps take the two separable products. Chosen by measurement: median
#: process CPU time of a train-mode forward+backward over BatchNorm2d's (batch 16, 1 thread, CPU
#: shared with other load), dense / separable: 5.7 / 7.8 at 1024x10x10, 7.1-7.4 / 8.5-9.4 at
#: 1024x11x11, 6.6-7.7 / 6.3-7.2 at 512x12x12, 8.1 / 6.1 at 512x13x13, 8.9 / 6.8 at 512x14x14.
DENSE_MAX_PIXELS = 121

_MATS: dict[tuple, tuple] = {}


def _separable_mats(h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """(aw, m, bw) in float64: rfft along W as (2W', W) (rows: real parts, then imaginary
    parts), the complex DFT along H on stacked [re, im] (2H, 2H), irfft along W (2W', W);
    orthonormal."""
    wr = w // 2 + 1
    fw = torch.fft.rfft(torch.eye(w, dtype=torch.float64), norm="ortho")  # (W, W')
    aw = torch.cat([fw.real.t(), fw.imag.t()], dim=0)
    fh = torch.fft.fft(torch.eye(h, dtype=torch.float64), norm="ortho")  # symmetric
    ch, sh = fh.real, -fh.imag  # F_H = ch - i sh
    # [re, im] (a row per column v) @ m = [ch re + sh im, ch im - sh re] = F_H (re + i im)
    m = torch.cat([torch.cat([ch, -sh], 1), torch.cat([sh, ch], 1)], 0)
    unit = torch.eye(wr, dtype=torch.complex128)
    bw = torch.cat([torch.fft.irfft(unit, n=w, norm="ortho"),
                    torch.fft.irfft(1j * unit, n=w, norm="ortho")], dim=0)
    return aw, m, bw


def _bin_classes(h: int, w: int) -> tuple[list[int], list[int]]:
    """Bins u * W + v of the one-sided spectrum: (self-conjugate bins, one bin of each pair
    {k, -k}). Together they count each of the H*W real degrees of freedom once."""
    selfc, pairs = [], []
    for u in range(h):
        for v in range(w // 2 + 1):
            mu, mv = (-u) % h, (-v) % w
            if (mu, mv) == (u, v):
                selfc.append(u * w + v)
            elif v not in (0, w - v) or u < mu:  # v = 0 or W/2: the partner is in the half too
                pairs.append(u * w + v)
    return selfc, pairs


def _real_basis(h: int, w: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """The orthonormal DFT rewritten as a real orthogonal (HW, HW) matrix q, float64.

    Column j of q is one real coefficient: Re X(k) for each of the m self-conjugate bins k, then
    sqrt(2) Re X(k) for one bin k of each of the P pairs {k, -k}, then sqrt(2) Im X(k) for the
    same bins (m + 2P = HW). So ``x.view(-1, HW) @ q`` is the whole spectrum of a real map and
    ``z @ q.T`` its inverse, and |X(k)|^2 = |X(-k)|^2 is the mean of the pair's two squared
    coefficients: a per-frequency statistic is a per-coefficient one, averaged over each pair.
    Also returns, for each coefficient, its bin u*W+v (``rep``), for each bin of the full
    spectrum the coefficient that carries its statistic (``full``), and m."""
    selfc, pairs = _bin_classes(h, w)
    eye = torch.eye(h * w, dtype=torch.float64).view(h * w, h, w)
    spec = torch.fft.fft2(eye, norm="ortho").reshape(h * w, h * w)  # row: pixel, column: bin
    root2 = math.sqrt(2.0)
    sel, pr = torch.tensor(selfc, dtype=torch.long), torch.tensor(pairs, dtype=torch.long)
    q = torch.cat([spec.real[:, sel], root2 * spec.real[:, pr], root2 * spec.imag[:, pr]], 1)
    q = torch.where(q.abs() < 1e-14, torch.zeros_like(q), q)  # exact zeros, not 1e-17
    rep = torch.cat([sel, pr, pr])
    full = torch.empty(h * w, dtype=torch.long)
    full[rep[: len(selfc) + len(pairs)]] = torch.arange(len(selfc) + len(pairs))
    uu, vv = torch.div(pr, w, rounding_mode="floor"), pr % w
    full[((-uu) % h) * w + (-vv) % w] = torch.arange(len(selfc), len(selfc) + len(pairs))
    return q, rep, full, len(selfc)


def _dft_mats(h: int, w: int, dtype: torch.dtype, device: torch.device):
    """The transform's matrices for (H, W), cached per size, dtype and device: (aw, m, bw) for
    the separable form, (q, rep, full, m) for the dense one (``_real_basis``)."""
    dense = _is_dense(h, w)
    key = (h, w, dense, dtype, str(device))
    # While torch.compile / torch.export trace, build them in the graph: a cached tensor made
    # during tracing would be a fake one.
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    mats = None if tracing else _MATS.get(key)
    if mats is None:
        if dense:
            q, rep, full, m = _real_basis(h, w)
            mats = (q.to(device=device, dtype=dtype).contiguous(), rep.to(device),
                    full.to(device), m)
        else:
            mats = tuple(t.to(device=device, dtype=dtype).contiguous()
                         for t in _separable_mats(h, w))
        if not tracing:
            _MATS[key] = mats
    return mats


def _is_dense(h: int, w: int) -> bool:
    return h * w <= DENSE_MAX_PIXELS


def _rdft2(d: Tensor, mats) -> Tensor:
    """Separable form: (B, H, W) real -> one-sided orthonormal spectrum, (W', B, 2, H).

    Three matrix products and no copies: the transform along W as aw @ d.T, whose rows
    (re/im, v) each hold a contiguous (B, H) block, then along H with each block as the left
    operand, so no axis is ever permuted in memory."""
    aw, m, _ = mats
    b, h, w = d.shape
    wr = w // 2 + 1
    t = (aw @ d.reshape(b * h, w).t()).view(2, wr * b, h)
    z = t[0] @ m[:h]
    z.addmm_(t[1], m[h:])
    return z.view(wr, b, 2, h)


def _irdft2(z: Tensor, mats) -> Tensor:
    """Separable form: (W', B, 2, H) one-sided spectrum -> Re of its inverse DFT, (B, H, W);
    the steps of ``_rdft2`` backwards, again without copies."""
    _, m, bw = mats
    wr, b, _, h = z.shape
    zf = z.reshape(wr * b, 2 * h)
    mt = m.t()
    a_re = (zf @ mt[:, :h]).view(wr, b * h)
    a_im = (zf @ mt[:, h:]).view(wr, b * h)
    y = a_re.t() @ bw[:wr]
    y.addmm_(a_im.t(), bw[wr:])
    return y.view(b, h, bw.shape[1])


def _hermitian_weights(wr: int, w: int, like: Tensor) -> Tensor:
    """Weight of each one-sided column v in a full-spectrum sum: 2, but 1 at v=0 and v=W/2."""
    wts = torch.full((wr,), 2.0, dtype=like.dtype, device=like.device)
    wts[0] = 1.0
    if w % 2 == 0:
        wts[-1] = 1.0
    return wts


def _pairs(t: Tensor) -> Tensor:
    """A per-bin (W', C, H) tensor laid out as the spectrum of one sample, (W', 1, C, 2, H), and
    contiguous within it: multiplying by it broadcasts over the batch only, which is the fast
    case (with a zero stride inside a sample the product runs on H-element pieces, 10-30x
    slower)."""
    wr, c, h = t.shape
    return t.unsqueeze(2).expand(wr, c, 2, h).contiguous().unsqueeze(1)


def _pair_mean(v: Tensor, m: int) -> Tensor:
    """(C, HW) per-coefficient values of the dense basis -> each pair's two entries replaced by
    their mean (self-conjugate coefficients, the first m, unchanged)."""
    p = (v.shape[1] - m) // 2
    out = v.clone()
    avg = (v[:, m:m + p] + v[:, m + p:]).mul_(0.5)
    out[:, m:m + p] = avg
    out[:, m + p:] = avg
    return out


class _DenseFrequencySBNTrain(torch.autograd.Function):
    """Training-mode frequency SBN on small maps: the spectrum is z = (x - E_n[x]) @ q with the
    real orthogonal basis q of ``_real_basis``, one (HW, HW) product over all N*C maps.

    var = pair mean of E_n[z^2], r = rsqrt(var + eps), s = gamma * r, y = (s z) @ q.T plus
    sqrt(HW) * beta at pixel (0, 0). Backward with G = g @ q and p = pair mean of E_n[G z]
    (z has zero batch mean, so g need not be centred for p): dx = (s (G - E_n G) - s r^2 p z)
    @ q.T, dgamma = N * sum r p, dbeta = sqrt(HW) * sum_n g(0, 0). Every factor is one (C, HW)
    map broadcast over the batch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):  # type: ignore[override]
        n, c, h, w = x.shape
        sd = _stat_dtype(x)
        q, _, full, m = _dft_mats(h, w, sd, x.device)
        xs = x.to(sd).contiguous()
        mean = xs.mean(0)
        # Centre before the transform: X - mu is the DFT of x - mean, with no cancellation.
        z = ((xs - mean).view(n * c, h * w) @ q).view(n, c * h * w)
        var = _pair_mean(z.square().sum(0).view(c, h * w).div_(n), m)
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(sd).view(c, 1) * rstd
        y = ((z * scale.view(-1)).view(n * c, h * w) @ q.t()).view(n, c, h, w)
        y[:, :, 0, 0] += math.sqrt(h * w) * bias.to(sd)
        ctx.save_for_backward(z, rstd, scale)
        ctx.param_dtype, ctx.size = weight.dtype, (h, w)
        var_full = var[:, full].view(c, h, w)
        ctx.mark_non_differentiable(mean, var_full)
        # y is a view of the matrix product; autograd forbids modifying a custom Function's view
        # output in place (as a residual `x += shortcut` does), and detach() is no view.
        return y.to(x.dtype).detach(), mean, var_full

    @staticmethod
    def backward(ctx, gy: Tensor, _gmean, _gvar):  # type: ignore[override]
        z, rstd, scale = ctx.saved_tensors
        (h, w), n, c = ctx.size, gy.shape[0], gy.shape[1]
        q, _, _, m = _dft_mats(h, w, z.dtype, z.device)
        g = gy.to(z.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gz = (g.view(n * c, h * w) @ q).view(n, c * h * w)
            p = _pair_mean((gz * z).sum(0).view(c, h * w).div_(n), m)
        if ctx.needs_input_grad[1]:
            grad_w = (p * rstd).sum(1).mul_(n).to(ctx.param_dtype)
        if ctx.needs_input_grad[0]:
            shift = (scale.view(-1) * gz.mean(0)).neg_()
            a = torch.addcmul(shift, gz, scale.view(-1))
            a.addcmul_(z, (scale * rstd * rstd * p).neg_().view(-1))
            grad_x = (a.view(n * c, h * w) @ q.t()).view(n, c, h, w).to(gy.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g[:, :, 0, 0].sum(0).mul_(math.sqrt(h * w)).to(ctx.param_dtype)
        return grad_x, grad_w, grad_b, None


class _FrequencySBNTrain(torch.autograd.Function):
    """Training-mode frequency SBN on larger maps, by the separable matmul DFT; hand-written
    backward. Spectra are (W', N, C, 2, H): [v, n, c, 0, u] = Re X(u, v), [..., 1, u] = Im.

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
        z = _rdft2((xs - mean).view(n * c, h, w), mats).view(wr, n, c, 2, h)
        var = z.square().sum(1).sum(2).div_(n)  # (W', C, H)
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(sd).view(1, c, 1) * rstd
        y = _irdft2((z * _pairs(scale)).view(wr, n * c, 2, h), mats).view(n, c, h, w)
        y[:, :, 0, 0] += math.sqrt(h * w) * bias.to(sd)
        ctx.save_for_backward(z, rstd, scale)
        ctx.param_dtype = weight.dtype
        var_full = _hermitian_full(var.permute(1, 2, 0), w).contiguous()
        ctx.mark_non_differentiable(mean, var_full)
        # y is a view of the matrix product; autograd forbids modifying a custom Function's view
        # output in place (as a residual `x += shortcut` does), and detach() is no view.
        return y.to(x.dtype).detach(), mean, var_full

    @staticmethod
    def backward(ctx, gy: Tensor, _gmean, _gvar):  # type: ignore[override]
        z, rstd, scale = ctx.saved_tensors
        wr, n, c, _, h = z.shape
        sd = z.dtype
        w = gy.shape[-1]
        mats = _dft_mats(h, w, sd, z.device)
        g = gy.to(sd).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gz = _rdft2((g - g.mean(0)).view(n * c, h, w), mats).view(wr, n, c, 2, h)
            p = (gz * z).sum(1).sum(2).div_(n)  # E_n Re(G conj Z), (W', C, H)
        if ctx.needs_input_grad[1]:
            wts = _hermitian_weights(wr, w, p).view(wr, 1, 1)
            grad_w = (p * rstd * wts).sum(dim=(0, 2)).mul_(n).to(ctx.param_dtype)
        if ctx.needs_input_grad[0]:
            gz.mul_(_pairs(scale)).addcmul_(z, _pairs(-scale * rstd * rstd * p))
            grad_x = _irdft2(gz.view(wr, n * c, 2, h), mats).view(n, c, h, w).to(gy.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g[:, :, 0, 0].sum(0).mul_(math.sqrt(h * w)).to(ctx.param_dtype)
        return grad_x, grad_w, grad_b, None


def _frequency_matmul_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """Returns (y, spatial_mean, full_var), as ``_frequency_fft`` does."""
    if _is_dense(*x.shape[-2:]):
        return _DenseFrequencySBNTrain.apply(x, weight, bias, eps)
    return _FrequencySBNTrain.apply(x, weight, bias, eps)


def _frequency_matmul_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                           eps: float) -> Tensor:
    """Frequency SBN with given (running) statistics: a per-channel circular filter of x - mean
    plus a one-pixel constant; differentiable through autograd (it is linear in x)."""
    n, c, h, w = x.shape
    sd = _stat_dtype(x)
    mats = _dft_mats(h, w, sd, x.device)
    scale = frequency_scale(var.to(sd), weight.to(sd), eps)  # symmetric under k -> -k
    d = (x.to(sd) - mean.to(sd)).contiguous()
    if _is_dense(h, w):
        q, rep = mats[0], mats[1]
        z = (d.view(n * c, h * w) @ q).view(n, c, h * w) * scale.reshape(c, h * w)[:, rep]
        y = (z.view(n * c, h * w) @ q.t()).view(n, c, h, w)
    else:
        wr = w // 2 + 1
        scale = scale[..., :wr].permute(2, 0, 1)
        z = _rdft2(d.view(n * c, h, w), mats).view(wr, n, c, 2, h) * _pairs(scale)
        y = _irdft2(z.view(wr, n * c, 2, h), mats).view(n, c, h, w)
    corner = torch.zeros(h, w, dtype=sd, device=x.device)
    corner[0, 0] = math.sqrt(h * w)
    y = y + bias.to(sd).view(1, c, 1, 1) * corner
    return y.to(x.dtype)
