"""HOG targets for LocalMIM.

Upstream computes, for each of its four scales and each RGB channel, a Sobel-gradient
orientation histogram at full resolution and average-pools it to that scale's grid. The
histogram does not depend on the scale, so `multi_scale_hog` computes it once per channel
and pools it once per scale that is still needed: the same numbers, about 2.4x cheaper.
Targets are computed in float32 with autocast off (upstream's conv ran in half precision
under fp16 autocast).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class HOGLayer(nn.Module):
    """One scale's HOG target (upstream's module; keeps its `conv` parameter names so
    checkpoints stay compatible). `pool` is the pooling window in pixels."""

    def __init__(self, nbins: int, pool: float, bias: bool = False, max_angle: float = math.pi):
        super().__init__()
        self.nbins = nbins
        self.pool = pool
        self.max_angle = max_angle
        self.conv = nn.Conv2d(1, 2, 3, stride=1, padding=1, padding_mode='reflect', bias=bias)
        sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        self.conv.weight.data = torch.stack([sobel, sobel.t()])[:, None]  # (2, 1, 3, 3)
        for p in self.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def histogram(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, H, W) float32 -> unpooled orientation histogram (N, nbins, H, W): each
        pixel puts its gradient magnitude into the bin of its gradient direction."""
        gxy = self.conv(x)  # (N, 2, H, W)
        magnitude = gxy.norm(dim=1, keepdim=True)  # (N, 1, H, W)
        phase = torch.atan2(gxy[:, 0], gxy[:, 1])  # (N, H, W), in [-pi, pi]
        bins = (phase / self.max_angle * self.nbins).floor().long() % self.nbins
        hist = torch.zeros(x.shape[0], self.nbins, x.shape[2], x.shape[3],
                           dtype=torch.float32, device=x.device)
        hist.scatter_(1, bins[:, None], magnitude)
        return hist

    def pool_and_normalize(self, hist: torch.Tensor, out_size: int) -> torch.Tensor:
        """(N, nbins, H, W) -> (N, nbins, out_size, out_size), L2-normalised over bins."""
        if hist.shape[-1] % out_size == 0 and hist.shape[-2] % out_size == 0:
            k = hist.shape[-1] // out_size
            pooled = F.avg_pool2d(hist, kernel_size=k, stride=k)
        else:  # e.g. patch 14 at scale 4: a 3.5-pixel window; pool to the grid directly
            pooled = F.adaptive_avg_pool2d(hist, out_size)
        return F.normalize(pooled, p=2, dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
        """Upstream's per-scale call: x (N, 1, H, W) -> (N, nbins, h, w)."""
        if out_size is None:
            out_size = int(round(x.shape[-1] / self.pool))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.pool_and_normalize(self.histogram(x.float()), out_size)


def _channels_to_tokens(hog: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*C, nbins, h, w) -> (B, h*w, C*nbins), channel-major as upstream's concat of R, G, B."""
    _, nbins, h, w = hog.shape
    return hog.reshape(batch, -1, h, w).flatten(2).transpose(1, 2)


@torch.no_grad()
def multi_scale_hog(imgs: torch.Tensor, hog_layers: Sequence[HOGLayer], out_sizes: Sequence[int],
                    scales: Sequence[int]) -> dict[int, torch.Tensor]:
    """HOG targets for the scale indices in `scales`: {k: (B, out_sizes[k]**2, C*nbins)}.

    The histogram is computed once for all scales when their Sobel convs are identical
    (always, unless --hog_bias gave each scale its own random bias, as upstream does)."""
    if not scales:
        return {}
    with torch.autocast(device_type=imgs.device.type, enabled=False):
        b, c, h, w = imgs.shape
        x = imgs.float().reshape(b * c, 1, h, w)  # every channel is its own image
        shared = all(layer.conv.bias is None for layer in hog_layers)
        hist = hog_layers[scales[0]].histogram(x) if shared else None
        out = {}
        for k in scales:
            layer = hog_layers[k]
            hist_k = hist if shared else layer.histogram(x)
            out[k] = _channels_to_tokens(layer.pool_and_normalize(hist_k, out_sizes[k]), b)
        return out
