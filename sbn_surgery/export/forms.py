"""Export forms of SpectralBatchNorm2d: eval-mode modules that compute the same map as the layer
with its running statistics, written with ops that ONNX runtimes have.

In eval mode SBN is a fixed linear map plus a constant (see docs/sbn.md):

* channel mode: ``y = s * x + S * k`` at pixel (0, 0) only, with ``s = gamma / sqrt(var + eps)``,
  ``k = beta - s * mu`` and ``S = sqrt(H * W)``;
* frequency mode: ``Y = F(x - m) * g + beta`` on the one-sided orthonormal spectrum, with the
  spatial-domain running mean ``m`` and the per-frequency gain
  ``g = frequency_scale(var, gamma, eps)``: a per-channel circular filter plus a constant pattern.
  The mean is subtracted before the transform: where a channel's input barely varies, x and m
  nearly cancel, and subtracting them first (exactly, in float32) keeps the rounding relative to
  the output; forming ``F(x) * g`` first loses digits to cancellation with ``F(m) * g``.

Three forms, one per export mode:

* :class:`DftForm` (``dft``): ``rfft2``, one multiply-add on the spectrum, ``irfft2``. The
  exporter writes the transforms as ONNX ``DFT`` nodes. Channel mode accepts any spatial size.
* :class:`MatmulForm` (``matmul``): the same spectrum arithmetic with the 2-D real DFT written as
  constant matrices (``MatMul`` in real arithmetic, no DFT op). Fixed spatial size.
* :class:`CornerForm` (``fold``, channel mode): ``y = s * x`` plus a one-pixel constant (a 1x1
  convolution of a one-channel map, see the class), where ``s`` is dropped when it is folded
  into the BatchNorm in front. Any spatial size.

Frequency mode has no elementwise form: its eval map is a per-channel circular filter whose
kernel covers the whole feature map. In ``fold`` mode it is written as :class:`MatmulForm` with
beta brought to the spatial domain as one constant pattern added after the inverse transform
(``y = F^-1(F(x - m) * g) + P``); see :func:`build_form`.

All constants are computed in float64 from the layer's buffers and stored in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import SpectralBatchNorm2d, channel_shape, frequency_scale, from_maps, to_maps

__all__ = ["SBNForm", "DftForm", "MatmulForm", "CornerForm", "build_form",
           "frequency_constants", "dense_dft_matrices", "separable_dft_matrices", "MATMUL_LAYOUTS"]

MATMUL_LAYOUTS = ("auto", "dense", "separable")
#: ``auto`` layout: one dense (H*W x 2*H*(W//2+1)) matrix per direction while H*W is at most
#: this, else the separable form (two small matrices per direction and two transposes).
DENSE_MAX_PIXELS = 256


# --------------------------------------------------------------------------------------------
# constants of the eval-mode map (float64)
# --------------------------------------------------------------------------------------------
def _affine64(sbn: SpectralBatchNorm2d) -> tuple[Tensor, Tensor]:
    c = sbn.num_features
    w = sbn.weight.detach().double().cpu() if sbn.weight is not None else torch.ones(c, dtype=torch.float64)
    b = sbn.bias.detach().double().cpu() if sbn.bias is not None else torch.zeros(c, dtype=torch.float64)
    return w, b


def frequency_constants(sbn: SpectralBatchNorm2d) -> tuple[Tensor, Tensor, Tensor]:
    """(m, g, beta), float64: the spatial-domain mean (C, H, W), the real gain on the one-sided
    spectrum (C, H, W//2+1) and beta (C,): frequency-mode eval SBN is
    ``Y = rfft2(x - m) * g + beta``."""
    w, b = _affine64(sbn)
    mean = sbn.running_mean.detach().double().cpu()
    var = sbn.running_var.detach().double().cpu()
    wr = var.shape[-1] // 2 + 1
    return mean, frequency_scale(var, w, sbn.eps)[..., :wr], b


# --------------------------------------------------------------------------------------------
# real DFT matrices (float64). Spectrum = one-sided orthonormal rfft2, real and imaginary parts.
# --------------------------------------------------------------------------------------------
def _angle(n: int, m: int, length: int) -> Tensor:
    """2*pi*(i*j mod length)/length for i < n, j < m (reduced exactly in integers)."""
    i = torch.arange(n, dtype=torch.int64).view(-1, 1)
    j = torch.arange(m, dtype=torch.int64).view(1, -1)
    return (2.0 * math.pi / length) * ((i * j) % length).double()


def _hermitian_weights(w: int) -> Tensor:
    """c_l for l < W//2+1: 1 for the self-conjugate columns (0, and W/2 when W is even), else 2."""
    wr = w // 2 + 1
    c = torch.full((wr,), 2.0, dtype=torch.float64)
    c[0] = 1.0
    if w % 2 == 0:
        c[-1] = 1.0
    return c


def dense_dft_matrices(h: int, w: int) -> tuple[Tensor, Tensor]:
    """(fwd, inv): ``x.flatten() @ fwd`` is the one-sided orthonormal spectrum laid out as
    (part, k, l) with part 0 = real, 1 = imaginary, shape (H*W, 2*H*Wr); ``spec @ inv`` is the
    real inverse (irfft2) of a spectrum in that layout, shape (2*H*Wr, H*W)."""
    wr = w // 2 + 1
    # angle[(hh, ww), (k, l)] = 2 pi (k hh / H + l ww / W)
    a_h = _angle(h, h, h)  # (hh, k)
    a_w = _angle(w, wr, w)  # (ww, l)
    ang = a_h.view(h, 1, h, 1) + a_w.view(1, w, 1, wr)  # (hh, ww, k, l)
    ang = ang.reshape(h * w, h * wr)
    root = math.sqrt(h * w)
    fwd = torch.cat([torch.cos(ang), -torch.sin(ang)], dim=1) / root
    c = _hermitian_weights(w).repeat(h)  # per (k, l)
    inv = torch.cat([(torch.cos(ang) * c).t(), (-torch.sin(ang) * c).t()], dim=0) / root
    return fwd, inv


def separable_dft_matrices(h: int, w: int) -> dict[str, Tensor]:
    """The four factors of the separable form (see :class:`MatmulForm`), float64:
    ``fw`` (W, 2Wr), ``fh`` (2H, 2H), ``ih`` (2H, 2H), ``iw`` (2Wr, W)."""
    wr = w // 2 + 1
    aw = _angle(w, wr, w)  # (ww, l)
    ah = _angle(h, h, h)  # (hh, k), symmetric
    cw, sw = torch.cos(aw), torch.sin(aw)
    ch, sh = torch.cos(ah), torch.sin(ah)
    fw = torch.cat([cw, -sw], dim=1) / math.sqrt(w)
    fh = torch.cat([torch.cat([ch, -sh], 1), torch.cat([sh, ch], 1)], 0) / math.sqrt(h)
    ih = torch.cat([torch.cat([ch, sh], 1), torch.cat([-sh, ch], 1)], 0) / math.sqrt(h)
    c = _hermitian_weights(w).view(-1, 1)
    iw = torch.cat([cw.t() * c, -sw.t() * c], dim=0) / math.sqrt(w)
    return {"fw": fw, "fh": fh, "ih": ih, "iw": iw}


# --------------------------------------------------------------------------------------------
# forms
# --------------------------------------------------------------------------------------------
class SBNForm(nn.Module):
    """Base of the export forms; records which layer it stands for and where its map lies
    (``map_layout``, ``prefix_tokens``, ``grid``: see ``layers.layout``). The spectral forms work
    on the NCHW view of the map; prefix tokens are multiplied by ``prefix_gain``."""

    form = "?"

    def __init__(self, path: str, stats: str, channels: int, *, map_layout: str = "nchw",
                 prefix_tokens: int = 0, grid: Optional[tuple[int, int]] = None,
                 prefix_gain: Optional[Tensor] = None) -> None:
        super().__init__()
        self.path = path
        self.stats = stats
        self.channels = channels
        self.map_layout = map_layout
        self.prefix_tokens = prefix_tokens
        self.grid = grid
        if prefix_gain is not None and prefix_tokens:
            self.register_buffer("prefix_gain", prefix_gain.float().view(1, 1, -1))
        else:
            self.prefix_gain = None

    def forward(self, x: Tensor) -> Tensor:
        if self.map_layout == "nchw":
            return self._forward_map(x)
        maps, prefix = to_maps(x, self.map_layout, self.prefix_tokens, self.grid,
                               need_grid=self.grid is not None)
        y = self._forward_map(maps)
        if prefix is not None and self.prefix_gain is not None:
            prefix = prefix * self.prefix_gain
        return from_maps(y, self.map_layout, prefix)

    def _forward_map(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        lay = "" if self.map_layout == "nchw" else f", layout={self.map_layout}"
        return f"{self.path}, stats={self.stats}, form={self.form}{lay}"


def _root(pixels, x: Tensor) -> Tensor | float:
    """sqrt(pixels), the pixel count of x's map: a Python float for concrete sizes, else a graph
    computation on sizes only (the exporter derives them from the model input's shape), so the
    result does not read x: a runtime that keeps x in a blocked layout (onnxruntime's NCHWc)
    need not convert it."""
    if isinstance(pixels, int):
        return math.sqrt(pixels)
    return torch.scalar_tensor(pixels, dtype=x.dtype, device=x.device).sqrt()


class CornerForm(SBNForm):
    """Channel mode, elementwise: ``y = x * scale`` (scale omitted when folded into the layer in
    front) plus ``sqrt(H*W) * shift`` at pixel (0, 0), in the map's own layout (no transposes):
    the first patch token of tokens, whose prefix tokens take the scale and no shift. Any
    spatial size and token count.

    On an NCHW map the one-pixel term is a 1x1 convolution, with the shifts as its constant
    weights, of a one-channel map per image that holds ``sqrt(H*W)`` at pixel (0, 0) and zeros
    elsewhere. A runtime that keeps feature maps in a blocked layout (onnxruntime's NCHWc) runs
    that convolution in its layout and fuses the add into it. The term written as a padded
    constant map (``Pad``, then ``Add``) made onnxruntime convert every such map out of its
    layout and back, and run the residual add and its activation unfused (1.03-1.08x a plain
    ResNet-50). Channels-last maps and tokens (MatMul outputs, never blocked) keep the padded
    constant."""

    form = "elementwise"

    def __init__(self, path: str, channels: int, scale: Optional[Tensor], shift: Tensor, *,
                 map_layout: str = "nchw", prefix_tokens: int = 0) -> None:
        super().__init__(path, "channel", channels, map_layout=map_layout,
                         prefix_tokens=prefix_tokens)
        shape = channel_shape(map_layout, channels)
        if scale is not None:
            self.register_buffer("scale", scale.float().view(shape))
        else:
            self.scale = None
        self.register_buffer("shift", shift.float().view(shape))

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.scale if self.scale is not None else x
        if self.map_layout == "tokens":
            p, length = self.prefix_tokens, x.shape[1] - self.prefix_tokens
            corner = self.shift * _root(length, x)
            return y + F.pad(corner, (0, 0, p, length - 1))
        if self.map_layout == "nhwc":
            h, w = x.shape[1:3]
            corner = self.shift * _root(h * w, x)
            return y + F.pad(corner, (0, 0, 0, w - 1, 0, h - 1))
        h, w = x.shape[-2:]
        root = x.new_ones((x.shape[0], 1, 1, 1)) * _root(h * w, x)
        one_pixel = F.pad(root, (0, w - 1, 0, h - 1))  # (N, 1, H, W): sqrt(H*W) at (0, 0)
        return y + F.conv2d(one_pixel, self.shift.view(-1, 1, 1, 1))


class DftForm(SBNForm):
    """``irfft2(rfft2(x - mean) * gain + const)`` with the spectrum as real pairs
    (view_as_real). Channel mode: no mean (it is part of ``const``), gain and const per channel,
    any spatial size; frequency mode: spatial mean and gain per frequency, const = beta."""

    form = "dft"

    def __init__(self, path: str, stats: str, channels: int, gain: Tensor, const: Tensor,
                 mean: Optional[Tensor] = None, spatial_size: Optional[tuple[int, int]] = None,
                 **lay) -> None:
        super().__init__(path, stats, channels, **lay)
        self.spatial_size = spatial_size
        c = channels
        if mean is not None:
            self.register_buffer("mean", mean.float().unsqueeze(0).contiguous())
        else:
            self.mean = None
        self.register_buffer("gain", (gain.view(c, 1, 1, 1) if gain.dim() == 1 else gain.unsqueeze(-1)).float())
        pair = torch.stack([const, torch.zeros_like(const)], dim=-1)
        self.register_buffer("const", pair.float().view(c, 1, 1, 2))

    def _forward_map(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.mean is not None:
            x = x - self.mean
        spec = torch.view_as_real(torch.fft.rfft2(x, norm="ortho"))
        spec = spec * self.gain + self.const
        return torch.fft.irfft2(torch.view_as_complex(spec), s=(h, w), norm="ortho")


class MatmulForm(SBNForm):
    """The spectrum arithmetic with the 2-D real DFT as constant matrices; fixed spatial size.

    ``dense`` layout: ``spec = (x - mean).flatten(2) @ fwd`` (one GEMM), ``spec * gain + const``,
    ``y = spec @ inv`` (+ ``pattern``). ``separable`` layout, for larger maps: the W transform as a
    right product with (W, 2Wr), a transpose to (Wr, [re|im], H), the H transform as a right
    product with (2H, 2H), the same arithmetic, and the way back. ``const`` (a real constant at
    every frequency) is added in the spectrum (the faithful form); ``pattern`` is the same
    constant brought to the spatial domain (fold mode); a form has one or the other. ``mean``
    (frequency mode) is subtracted before the transform.
    """

    form = "matmul"

    def __init__(self, path: str, stats: str, channels: int, spatial_size: tuple[int, int],
                 gain: Tensor, const: Tensor, *, mean: Optional[Tensor] = None,
                 layout: str = "auto", spatial_constant: bool = False, **lay) -> None:
        super().__init__(path, stats, channels, **lay)
        h, w = spatial_size
        if layout not in MATMUL_LAYOUTS:
            raise ValueError(f"layout must be one of {MATMUL_LAYOUTS}; got {layout!r}")
        if layout == "auto":
            layout = "dense" if h * w <= DENSE_MAX_PIXELS else "separable"
        self.layout = layout
        self.spatial_size = (int(h), int(w))
        c, wr = channels, w // 2 + 1
        if gain.dim() == 1:  # channel mode: one gain per channel, broadcast over the spectrum
            self.register_buffer("gain", gain.float().view((c, 1) if layout == "dense" else (c, 1, 1)))
        else:
            self.register_buffer("gain", self._lay_out(torch.stack([gain, gain]), c, h, wr))
        if mean is not None:
            self.register_buffer("mean", mean.float().contiguous())  # (C, H, W), before flattening
        else:
            self.mean = None
        if spatial_constant:  # a real constant k at every frequency is sqrt(H*W) * k at pixel (0, 0)
            pattern = torch.zeros(c, h, w, dtype=torch.float64)
            pattern[:, 0, 0] = const * math.sqrt(h * w)
            self.register_buffer("pattern", self._spatial(pattern, c, h, w))
            self.const = None
        else:
            re = const.view(c, 1, 1).expand(c, h, wr)
            self.register_buffer("const", self._lay_out(torch.stack([re, torch.zeros_like(re)]), c, h, wr))
            self.pattern = None
        if layout == "dense":
            fwd, inv = dense_dft_matrices(h, w)
            self.register_buffer("fwd", fwd.float())
            self.register_buffer("inv", inv.float())
        else:
            for name, mat in separable_dft_matrices(h, w).items():
                self.register_buffer(name, mat.float())

    def _lay_out(self, parts: Tensor, c: int, h: int, wr: int) -> Tensor:
        """(2, C, H, Wr) [real, imag] -> the layout of this form's spectrum."""
        if self.layout == "dense":  # (C, [part, k, l])
            return parts.permute(1, 0, 2, 3).reshape(c, 2 * h * wr).float().contiguous()
        return parts.permute(1, 3, 0, 2).reshape(c, wr, 2 * h).float().contiguous()  # (C, l, [part, k])

    def _spatial(self, pattern: Tensor, c: int, h: int, w: int) -> Tensor:
        if self.layout == "dense":
            return pattern.reshape(c, h * w).float().contiguous()
        return pattern.float().contiguous()

    def _forward_map(self, x: Tensor) -> Tensor:
        h, w = self.spatial_size
        if tuple(x.shape[-2:]) != (h, w):
            raise ValueError(
                f"{self.path}: the matmul form of this SBN is built for {h}x{w} feature maps; got "
                f"shape {tuple(x.shape)}"
            )
        if self.mean is not None:
            x = x - self.mean
        if self.layout == "dense":
            spec = torch.matmul(x.flatten(2), self.fwd) * self.gain
            if self.const is not None:
                spec = spec + self.const
            y = torch.matmul(spec, self.inv)
            if self.pattern is not None:
                y = y + self.pattern
            return y.unflatten(2, (h, w))
        wr = w // 2 + 1
        z = torch.matmul(x, self.fw)  # (N, C, H, [part, l])
        z = z.unflatten(-1, (2, wr)).permute(0, 1, 4, 3, 2).flatten(-2)  # (N, C, l, [part, h])
        z = torch.matmul(z, self.fh) * self.gain  # (N, C, l, [part, k])
        if self.const is not None:
            z = z + self.const
        z = torch.matmul(z, self.ih)  # (N, C, l, [part, h])
        z = z.unflatten(-1, (2, h)).permute(0, 1, 4, 3, 2).flatten(-2)  # (N, C, h, [part, l])
        y = torch.matmul(z, self.iw)
        if self.pattern is not None:
            y = y + self.pattern
        return y


# --------------------------------------------------------------------------------------------
# choosing a form
# --------------------------------------------------------------------------------------------
def build_form(sbn: SpectralBatchNorm2d, path: str, mode: str, spatial_size: tuple[int, int], *,
               folded: bool = False, layout: str = "auto") -> SBNForm:
    """The export form of ``sbn`` (eval mode, running statistics) for ``mode``, in the layout
    of the layer's map (``sbn.layout``).

    ``folded=True`` (channel mode, ``fold``): the caller has multiplied the layer in front by
    the scale, so the form keeps only the one-pixel constant.
    ``spatial_size`` is the (H, W) of the map this layer sees at the export input size; the
    matmul form and frequency mode are built for it. ``layout`` is the matmul form's matrix
    layout (``MATMUL_LAYOUTS``).
    """
    c = sbn.num_features
    map_layout, prefix = getattr(sbn, "layout", "nchw"), getattr(sbn, "prefix_tokens", 0)
    if sbn.stats == "channel":
        s, k = sbn.channel_constants()
        if mode == "fold":
            return CornerForm(path, c, None if folded else s, k, map_layout=map_layout,
                              prefix_tokens=prefix)
        # channel mode is the same on any grid of the same pixel count: a spectral form takes
        # the tokens' grid only where its matrices are built for one (matmul)
        lay = dict(map_layout=map_layout, prefix_tokens=prefix, prefix_gain=s,
                   grid=spatial_size if map_layout == "tokens" and mode == "matmul" else None)
        if mode == "dft":
            return DftForm(path, "channel", c, s, k, **lay)
        return MatmulForm(path, "channel", c, spatial_size, s, k, layout=layout, **lay)
    m, g, beta = frequency_constants(sbn)
    w, _ = _affine64(sbn)
    gain = w / torch.sqrt(sbn.running_var.detach().double().cpu().mean(dim=(1, 2)) + sbn.eps)
    lay = dict(map_layout=map_layout, prefix_tokens=prefix, prefix_gain=gain,
               grid=spatial_size if map_layout == "tokens" else None)
    if mode == "dft":
        return DftForm(path, "frequency", c, g, beta, mean=m, spatial_size=spatial_size, **lay)
    return MatmulForm(path, "frequency", c, spatial_size, g, beta, mean=m, layout=layout,
                      spatial_constant=(mode == "fold"), **lay)
