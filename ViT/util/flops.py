"""Analytic FLOP counts of a LocalMIM training step and FreezeOut's expected saving
(the idea of FreezeOut's calc_speedup, for this model).

Counted: matrix multiplies and attention of every encoder block (on the 1 + kept tokens),
the patch embedding (on all patches), each tap's decoder (embedding, one block on all
1 + L tokens, the prediction head) and the HOG targets; the loss is negligible. Backward costs
twice the forward for layers that train (input and weight gradients), except the patch
embedding, whose input (the images) needs no gradient: once its forward. A frozen layer costs
only its forward; a dropped tap costs nothing.
Memory traffic, optimizer steps and kernel launch gaps are not counted, so the figures are
estimates of GPU work, not of wall time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from util import freezeout as fo


@dataclass(frozen=True)
class ModelShape:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 256
    hog_nbins: int = 9
    mask_ratio: float = 0.75

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def kept(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def taps(self) -> list[int]:
        return [1, 3, self.depth - 3, self.depth - 1]


SHAPES = {  # constructor name -> shape at 224
    'MIM_vit_tiny_patch16': ModelShape(embed_dim=192),
    'MIM_vit_small_patch16': ModelShape(embed_dim=384),
    'MIM_vit_base_patch16': ModelShape(embed_dim=768),
    'MIM_vit_large_patch16': ModelShape(embed_dim=1024, depth=24),
    'MIM_vit_huge_patch14': ModelShape(patch_size=14, embed_dim=1280, depth=32),
}
SCALES = [4.0, 2.0, 1.0, 0.5]


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one transformer block: qkv + proj (8 n d^2), MLP (4 r n d^2), attention (4 n^2 d)."""
    return 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim


def layer_forward_flops(shape: ModelShape) -> list[float]:
    """Forward FLOPs of the FreezeOut layers: [patch embedding, block 0, ..., block depth-1]."""
    patch = 2 * shape.num_patches * 3 * shape.patch_size ** 2 * shape.embed_dim
    block = block_flops(1 + shape.kept, shape.embed_dim, shape.mlp_ratio)
    return [patch] + [block] * shape.depth


def decoder_forward_flops(shape: ModelShape, scale: float) -> float:
    n, d, out = shape.num_patches, shape.decoder_dim, 3 * shape.hog_nbins
    flops = 2 * (1 + shape.kept) * shape.embed_dim * d + block_flops(1 + n, d, shape.mlp_ratio)
    if scale == 4.0:   # two 2x2 transposed convs, then 1x1 to the bins
        flops += 2 * d * (d // 2) * 4 * n + 2 * (d // 2) * (d // 4) * 4 * (4 * n) + 2 * (d // 4) * out * 16 * n
    elif scale == 2.0:
        flops += 2 * d * (d // 2) * 4 * n + 2 * (d // 2) * out * 4 * n
    elif scale == 1.0:
        flops += 2 * d * out * n
    else:
        flops += 2 * d * out * n / 4
    return flops


def hog_flops(shape: ModelShape, live_scales: int) -> float:
    """Sobel conv (2 filters of 3x3) + magnitude/angle/binning per pixel and channel, once;
    pooling per live scale."""
    pixels = 3 * shape.img_size ** 2
    return pixels * (2 * 2 * 9 + 20) + live_scales * pixels * shape.hog_nbins


def step_flops(shape: ModelShape, num_frozen: int, decoder_freeze: str = 'tap') -> float:
    """FLOPs of one training step per image with the first `num_frozen` layers frozen."""
    layers = layer_forward_flops(shape)
    # layer 0 (the patch embedding) has no input gradient to compute: forward + weight gradient
    total = sum(f if i < num_frozen else (2 if i == 0 else 3) * f for i, f in enumerate(layers))
    # blocks after the last live tap are not run at all; with LocalMIM's taps the last block
    # is always a tap, so every block runs
    live = [j for j, b in enumerate(shape.taps) if decoder_freeze == 'never' or b + 1 >= num_frozen]
    total += sum(3 * decoder_forward_flops(shape, SCALES[j]) for j in live)
    return total + (hog_flops(shape, len(live)) if live else 0.0)


def freezeout_speedup(shape: ModelShape, t_0: float, how_scale: str, decoder_freeze: str = 'tap') -> dict:
    """Average step cost over a FreezeOut run relative to a plain run. Layer i is frozen for
    the last (1 - t_i) of the run, so the time with k layers frozen is t_k - t_{k-1}."""
    t = fo.freeze_fractions(shape.depth + 1, t_0, how_scale)
    plain = step_flops(shape, 0, decoder_freeze)
    average, previous = 0.0, 0.0
    for k in range(shape.depth + 1):  # k layers frozen between t_{k-1} and t_k
        average += (t[k] - previous) * step_flops(shape, k, decoder_freeze)
        previous = t[k]
    return {'plain_gflops_per_image': plain / 1e9, 'average_gflops_per_image': average / 1e9,
            'flops_ratio': average / plain, 'saving': 1 - average / plain, 'speedup': plain / average}


def epoch_costs(shape: ModelShape, freeze_steps: Sequence[int], steps_per_epoch: int, epochs: int,
                decoder_freeze: str = 'tap') -> list[float]:
    """Estimated FLOPs per image of each epoch's mean step, when layer i freezes at step
    freeze_steps[i] (nondecreasing; none for a plain run). For a run's time-left estimate."""
    cost_with = [step_flops(shape, k, decoder_freeze) for k in range(len(freeze_steps) + 1)]
    starts = [0, *freeze_steps]  # k layers frozen from starts[k] until starts[k + 1]
    ends = [*freeze_steps, float('inf')]
    costs = []
    for epoch in range(epochs):
        lo, hi = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch
        steps_with = [max(0, min(hi, end) - max(lo, start)) for start, end in zip(starts, ends)]
        costs.append(sum(n * c for n, c in zip(steps_with, cost_with)) / steps_per_epoch)
    return costs
