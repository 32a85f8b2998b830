"""Simulated (fake) quantization: integer grids in floating point, for accuracy studies.

Weights: symmetric signed ``b``-bit, per output channel or per tensor, with
round-to-nearest on the max-abs range (``rtn``) or an MSE-optimal clipping
range searched on a grid (``mse``). The quantize-dequantize error of any
weight is at most half a step, ``scale / 2``, inside the clipping range.

Activations: asymmetric unsigned ``b``-bit per tensor (like ONNX Runtime's
uint8 activations), range calibrated on real batches by ``minmax``,
``percentile`` or ``mse``; :class:`ActQuant` modules hold the scale and zero
point as buffers, so a quantized model saves, loads and evaluates like any
other.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fake_quant_weight", "weight_scale", "weight_grid_scale", "ActQuant", "CLIP_GRID", "ACT_METHODS"]

CLIP_GRID = torch.linspace(0.3, 1.0, 36).tolist()
#: How an activation range is calibrated (:class:`ActQuant`).
ACT_METHODS = ("minmax", "percentile", "mse")


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``w`` as one row per output channel, or as a single row."""
    return w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)


def _shaped(scale: torch.Tensor, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """One scale per row, shaped to broadcast against ``w`` (``(C, 1, ...)``), or a scalar."""
    return scale.reshape(-1, *([1] * (w.dim() - 1))) if per_channel else scale.reshape(())


def weight_scale(w: torch.Tensor, bits: int, *, per_channel: bool = True, method: str = "rtn") -> torch.Tensor:
    """Scale per output channel (shape ``(C, 1, ...)``) or per tensor (a scalar)."""
    flat = _rows(w, per_channel)
    amax = flat.abs().amax(dim=1).clamp(min=1e-12)
    qmax = _qmax(bits)
    if method == "rtn":
        scale = amax / qmax
    elif method == "mse":
        best = torch.full_like(amax, float("inf"))
        scale = amax / qmax
        for frac in CLIP_GRID:
            s = (amax * frac / qmax).unsqueeze(1)
            q = torch.clamp(torch.round(flat / s), -qmax, qmax) * s
            err = (q - flat).square().sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s.squeeze(1), scale)
    else:
        raise ValueError(f"unknown weight quantization method '{method}'; use rtn or mse")
    return _shaped(scale, w, per_channel)


def fake_quant_weight(w: torch.Tensor, bits: int, *, per_channel: bool = True, method: str = "rtn") -> torch.Tensor:
    """Quantize-dequantize ``w`` to symmetric signed ``bits``."""
    scale = weight_scale(w, bits, per_channel=per_channel, method=method).to(w.dtype)
    qmax = _qmax(bits)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def weight_grid_scale(w: torch.Tensor, bits: int, *, per_channel: bool = True) -> torch.Tensor:
    """The scale of a weight already on its ``bits``-bit grid (the output of :func:`fake_quant_weight`).

    Whether the range was max-abs or MSE-clipped, the largest step count of
    a quantized channel is ``2**(bits-1) - 1`` (clipped values saturate
    there), so ``max |w| / qmax`` is the scale; an all-zero channel gets 1.
    Shape as :func:`weight_scale`.
    """
    amax = _rows(w, per_channel).abs().amax(dim=1)
    return _shaped(torch.where(amax > 0, amax / _qmax(bits), torch.ones_like(amax)), w, per_channel)


class ActQuant(nn.Module):
    """Per-tensor asymmetric unsigned fake quantization of an activation.

    ``calibrating`` collects statistics (min/max, or a sample of values for
    ``percentile`` / ``mse``); :meth:`finish_calibration` sets ``scale`` and
    ``zero_point``; afterwards ``forward`` quantizes.
    """

    def __init__(self, bits: int = 8, method: str = "minmax", percentile: float = 99.99):
        super().__init__()
        if method not in ACT_METHODS:
            raise ValueError(f"unknown activation calibration '{method}'; use {', '.join(ACT_METHODS)}")
        self.bits, self.method, self.percentile = bits, method, percentile
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.calibrating = False
        self._samples: list[torch.Tensor] = []
        self._min = self._max = None

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            flat = x.detach().float().reshape(-1)
            lo, hi = flat.min(), flat.max()
            self._min = lo if self._min is None else torch.minimum(self._min, lo)
            self._max = hi if self._max is None else torch.maximum(self._max, hi)
            if self.method != "minmax":
                step = max(1, flat.numel() // 65536)
                self._samples.append(flat[::step].cpu())
            return x
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, self.levels)
        return (q - self.zero_point) * self.scale

    def _range_for(self, lo: float, hi: float) -> tuple[float, float]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exactly representable
        return lo, hi

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self._min is None:
            raise RuntimeError("ActQuant saw no data during calibration")
        lo, hi = float(self._min), float(self._max)
        if self.method == "percentile":
            sample = torch.cat(self._samples)
            q = torch.tensor([(100 - self.percentile) / 100, self.percentile / 100])
            lo, hi = (float(v) for v in torch.quantile(sample, q))
        elif self.method == "mse":
            sample = torch.cat(self._samples)
            best, best_range = float("inf"), (lo, hi)
            for frac in CLIP_GRID:
                l, h = self._range_for(lo * frac, hi * frac)
                s = max((h - l) / self.levels, 1e-12)
                zp = round(-l / s)
                q = (torch.clamp(torch.round(sample / s) + zp, 0, self.levels) - zp) * s
                err = float((q - sample).square().mean())
                if err < best:
                    best, best_range = err, (l, h)
            lo, hi = best_range
        lo, hi = self._range_for(lo, hi)
        scale = max((hi - lo) / self.levels, 1e-12)
        self.scale.fill_(scale)
        self.zero_point.fill_(float(round(-lo / scale)))
        self.calibrating = False
        self._samples, self._min, self._max = [], None, None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
