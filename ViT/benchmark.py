"""Throughput of one training step and of the input pipelines, on one device.

    python benchmark.py --device cuda --model MIM_vit_base_patch16 --batch_size 256 --out bench \
        --how_scale cubic --t_0 0.8 --data_path ../data/imagenet-sample-40 --repeat 64

Measures, on synthetic input (random normal images on the device):
  (a) the upstream LocalMIM step, re-implemented as upstream ran it: fp16 autocast with a
      GradScaler, the total gradient norm every step, HOG targets per scale and channel
      (4 x 3 HOGLayer calls), AdamW with torch's default kernels (foreach, not fused), loss.item() and a
      synchronisation every step (on CPU: fp32, no scaler, otherwise the same);
  (b) this project's step as run_pretrain.py runs it: engine_pretrain.train_one_epoch itself on
      a loader repeating the batch (autocast, return_terms, fused AdamW from util.optim,
      device-side loss means), with k = 0 .. L-1 layers frozen by the FreezeOut applier (--ks
      for a subset), optionally under torch.compile;
  (c) the FreezeOut schedule average for --how_scale/--t_0: time per image with k frozen,
      weighted by the fraction of the run with k frozen (t_k - t_{k-1}), the projected epoch
      time, and util.flops' estimate for comparison;
  (d) images/s of each input backend (pil, gpu, gpu-cache) on --data_path, if given (GPU
      backends are skipped, with a note, on a CPU device); the gpu backend at each
      --cpu_decode_shares value (the share of every batch decoded by the CPU workers);
  (e) end to end: the project step (b) fed by each backend's real batches instead of a
      synthetic one, with k = 0 and k = L-1 frozen (--e2e_ks): if the input keeps up with the
      fastest step, it keeps up over the whole FreezeOut schedule.
Writes <out>/benchmark.json, <out>/benchmark.md and <out>/benchmark_freeze.png.
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from util import freezeout as fo
from util.cli import ArgumentParser, check_output_folder
from util.flags import AMP_CHOICES, BACKENDS, GPU_RESAMPLE_CHOICES, MIM_MODELS, answer_before_imports

LR, WEIGHT_DECAY = 1.5e-4, 0.05
IMAGENET_TRAIN_IMAGES = 1_281_167


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description='LocalMIM / FreezeOut throughput benchmark')
    p.add_argument('--model', default='MIM_vit_base_patch16', help=f'one of: {", ".join(sorted(MIM_MODELS))}')
    p.add_argument('--input_size', default=224, type=int, help='image side')
    p.add_argument('--batch_size', default=256, type=int, help='images per step')
    p.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches removed')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--amp', default='auto', choices=list(AMP_CHOICES),
                   help="the project step's precision, as run_pretrain.py (the reference is always fp16 on CUDA)")
    p.add_argument('--steps', default=20, type=int, help='timed steps (and timed loader batches)')
    p.add_argument('--warmup', default=5, type=int, help='untimed steps first (and after each freeze change)')
    p.add_argument('--ks', default=None, type=int, nargs='+',
                   help='numbers of frozen layers to time (default: all, 0 .. L-1)')
    p.add_argument('--how_scale', default='cubic', choices=list(fo.SCALE_FUNCTIONS),
                   help='FreezeOut schedule whose average is projected (as run_pretrain.py)')
    p.add_argument('--t_0', default=0.8, type=float, help='FreezeOut t_0 of the projected schedule')
    p.add_argument('--decoder_freeze', default='tap', choices=list(fo.DECODER_FREEZE_MODES),
                   help='what happens to a LocalMIM decoder when its tap freezes (as run_pretrain.py)')
    p.add_argument('--compile', action='store_true', help='torch.compile the project step')
    p.add_argument('--compile_backend', default='inductor', help=argparse.SUPPRESS)  # 'eager' in CPU smoke runs
    p.add_argument('--skip_reference', action='store_true', help='do not time the upstream step')
    p.add_argument('--epoch_images', default=IMAGENET_TRAIN_IMAGES, type=int,
                   help='images per epoch for the projected epoch times (default: ImageNet-1k train)')
    p.add_argument('--data_path', default=None, help='ImageFolder for the input-pipeline timings (optional)')
    p.add_argument('--repeat', default=1, type=int, help='repeat the file list N times (symlinks) for a longer epoch')
    p.add_argument('--backends', default=list(BACKENDS), nargs='+', choices=list(BACKENDS),
                   help='input backends to time')
    p.add_argument('--num_workers', default=10, type=int, help='loader workers (pil, gpu; gpu-cache decoding)')
    p.add_argument('--cache_size', default=None, type=int, help='gpu-cache image side (default as run_pretrain.py)')
    p.add_argument('--gpu_resample', default='bicubic', choices=GPU_RESAMPLE_CHOICES,
                   help="gpu, gpu-cache: the crop's resize, as run_pretrain.py --gpu_resample")
    p.add_argument('--decode_ahead', default=2, type=int, help='gpu backend: batches prepared ahead, as run_pretrain.py')
    p.add_argument('--cpu_decode_shares', default=[0.0], type=float, nargs='+',
                   help="gpu backend: time it at each of these run_pretrain.py --cpu_decode_share values "
                        "(shown as 'gpu (cpu decode S)' for S > 0)")
    p.add_argument('--e2e_ks', default=None, type=int, nargs='*',
                   help='frozen k for the end-to-end runs on each backend (default: 0 and L-1; none: skip)')
    p.add_argument('--out', default='benchmark_out', help='folder for benchmark.json / .md / _freeze.png')
    p.add_argument('--check_targets', default=None, metavar='FOLDER',
                   help="only report: the performance targets checked against measure_gpu.sh's results in FOLDER")
    return p


if __name__ == '__main__':
    answer_before_imports(get_args_parser())

# the rest of the imports load torch, timm and torchvision (seconds): after the parser, so that
# --help and a refused flag are answered without them
import torch  # noqa: E402

import models_mim  # noqa: E402
from engine_pretrain import ModelHandle, train_one_epoch  # noqa: E402
from util import flops, gpu_data  # noqa: E402
from util.checkpoint import write_text_atomic  # noqa: E402
from util.data import IMAGE_EXTENSIONS, class_folders, is_hidden, resolve_image_folder  # noqa: E402
from util.gpu_data import build_loader  # noqa: E402
from util.lr_sched import set_group_lrs, warmup_cosine_lr  # noqa: E402
from util.optim import build_adamw, param_groups_weight_decay  # noqa: E402
from util.runtime import allow_recompiles, check_number_flags, resolve_device_and_amp  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def spread_text(spread: float | None) -> str:
    return f', halves differ by {spread:.1%}' if spread is not None else ''


def noise_line(result: dict) -> str | None:
    """One sentence on the timing noise of a benchmark.json's step figures (None in files of
    older versions, or with one timed step)."""
    spreads = [x for x in [result.get('reference_spread'), *(result.get('freeze_spread') or [])] if x is not None]
    if not spreads:
        return None
    return (f'Timing noise: the two halves of each timed run differed by {statistics.median(spreads):.1%} '
            f'(median of {len(spreads)}) and at most {max(spreads):.1%}; smaller differences between figures '
            'are noise.')


def synthetic_images(batch: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device)


# ---- (a) the upstream step -------------------------------------------------------------------
@torch.no_grad()
def upstream_hog_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """Upstream's HOGLayer.forward, op for op under whatever autocast is active: in the fp16
    reference step the Sobel conv, atan2 and binning run in half precision and the magnitude
    in float32 (autocast's norm), unlike the project's targets (float32 throughout).
    x (N, 1, H, W) -> (N, nbins, H / pool, W / pool)."""
    gxy = layer.conv(x)  # (N, 2, H, W)
    magnitude = gxy.norm(dim=1)[:, None]  # (N, 1, H, W)
    phase = torch.atan2(gxy[:, 0], gxy[:, 1])[:, None]  # (N, 1, H, W)
    bins = (phase / layer.max_angle * layer.nbins).floor().long() % layer.nbins
    n, _, h, w = gxy.shape
    hist = torch.zeros(n, layer.nbins, h, w, dtype=torch.float, device=x.device)
    hist.scatter_(1, bins, magnitude.float())
    return layer.pool_and_normalize(hist, int(round(w / layer.pool)))  # float32 pooling, as upstream


def upstream_hog(model, imgs: torch.Tensor, k: int) -> torch.Tensor:
    """Upstream's MaskedAutoencoderViT.HOG: one HOG layer call per channel for scale k."""
    feats = [upstream_hog_layer(model.hog_enc[k], imgs[:, c:c + 1]) for c in range(imgs.shape[1])]
    return torch.cat(feats, 1).flatten(2, 3).transpose(1, 2)


def upstream_forward(model, imgs: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Upstream's forward: every block, every tap, 4 decoders, per-scale HOG targets."""
    x = model.patch_embed(imgs)
    x = x + model.pos_embed[:, 1:]
    x, mask, ids_restore = model.random_masking(x, mask_ratio)
    cls_tokens = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    latent = []
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        if i in model.ID:
            latent.append(model.norm[model.ID.index(i)](x))
    pred = [model.decoder[i](latent[i], ids_restore) for i in range(len(latent))]
    target = [upstream_hog(model, imgs, k) for k in range(len(model.hog_enc))]
    loss = 0.
    for k in range(len(pred)):
        m = model.recal_mask(mask, k)
        loss += (((pred[k] - target[k]) ** 2).mean(dim=-1) * m).sum() / m.sum()
    return loss


def upstream_grad_norm(parameters) -> torch.Tensor:
    """util.misc.get_grad_norm_ of upstream (MAE): a norm per tensor, then their norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g.detach(), 2.0) for g in grads]), 2.0)


class ReferenceStep:
    """Upstream engine_pretrain's iteration: per-step lr, fp16 autocast, loss.item(),
    NativeScalerWithGradNormCount (scale, backward, unscale, grad norm, step, update),
    zero_grad, synchronize."""

    def __init__(self, model_name: str, input_size: int, device: torch.device, mask_ratio: float):
        self.device, self.mask_ratio = device, mask_ratio
        self.model = models_mim.build_model(model_name, img_size=input_size).to(device)
        self.model.train(True)
        groups = param_groups_weight_decay(self.model, WEIGHT_DECAY)
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=False)  # torch's default (foreach on CUDA)
        self.cuda = device.type == 'cuda'
        self.scaler = torch.amp.GradScaler('cuda') if self.cuda else None
        self.it = 0

    def step(self, imgs: torch.Tensor) -> float:
        # upstream's per-iteration lr (here at epoch 100 of 400, past the warmup)
        set_group_lrs(self.optimizer, warmup_cosine_lr(100 + self.it / 1000, LR, 1e-6, 40, 400))
        self.it += 1
        ctx = torch.autocast('cuda', dtype=torch.float16) if self.cuda else contextlib.nullcontext()
        with ctx:
            loss = upstream_forward(self.model, imgs, self.mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f'error: reference loss is {loss_value}')
        params = list(self.model.parameters())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            upstream_grad_norm(params)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            upstream_grad_norm(params)
            self.optimizer.step()
        self.optimizer.zero_grad()
        sync(self.device)
        return loss_value


# ---- (b) the project's step ------------------------------------------------------------------
class _SameBatch:
    """A loader (the engine's interface) yielding one device batch n times."""

    def __init__(self, images: torch.Tensor, n: int):
        self.images, self.n = images, n
        self.targets = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.images, self.targets


class _Applied:
    """Schedule hook for the engine: the frozen set and lrs were applied beforehand."""

    def on_step(self, step: int) -> bool:
        return False

    def layer_lrs(self) -> dict:
        return {}


class ProjectStep:
    """The project's step as run_pretrain.py runs it: engine_pretrain.train_one_epoch itself
    (autocast, return_terms, backward and fused AdamW step, device-side loss means, one
    sync per --print_freq window) on FreezeOut's param groups, k layers frozen by the applier."""

    PRINT_FREQ = 50  # run_pretrain.py's default

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.device, self.amp, self.mask_ratio = device, args.amp, args.mask_ratio
        model = models_mim.build_model(args.model, img_size=args.input_size).to(device)
        model.train(True)
        self.model = model
        # a long run, so that every k is reached at its own step
        self.schedule = fo.FreezeOutSchedule.build(model.num_layers, model.tap_layers, LR, args.t_0, args.how_scale,
                                                   True, args.decoder_freeze, 1, 10_000_000, 0)
        layer_of = lambda name: fo.schedule_layer(name, model.tap_layers, args.decoder_freeze,  # noqa: E731
                                                  model.num_layers)
        self.optimizer = build_adamw(param_groups_weight_decay(model, WEIGHT_DECAY, layer_of), LR, device)
        self.freezeout = fo.FreezeOut(model, self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(device.type) if args.amp == 'fp16' else None
        if args.compile:
            allow_recompiles(2 * model.num_layers + 8)  # one graph per freeze event, and margin
        self.handle = ModelHandle(model, (lambda m: torch.compile(m, backend=args.compile_backend))
                                  if args.compile else (lambda m: m))

    def step_with_frozen(self, k: int) -> int:
        """The first schedule step at which exactly k layers are frozen (0 for k = 0)."""
        step = 0 if k == 0 else self.schedule.freeze_steps[k - 1]
        if self.schedule.num_frozen(step) != k:
            raise SystemExit(f'error: no step of the schedule has exactly {k} layers frozen')
        return step

    def set_frozen(self, k: int) -> None:
        if self.freezeout.on_step(self.step_with_frozen(k)):
            self.handle.rewrap()  # as the engine does after a freeze event
        assert self.model.num_frozen == k

    def run(self, images: torch.Tensor, steps: int) -> dict:
        """`steps` training steps on `images` through the engine (its console lines muted)."""
        return self.run_loader(_SameBatch(images, steps), images.shape[0])

    def run_loader(self, loader, batch_size: int) -> dict:
        """One engine epoch over `loader` (its console lines muted)."""
        if len(loader) < 1:
            return {}
        args = argparse.Namespace(accum_iter=1, batch_size=batch_size, print_freq=self.PRINT_FREQ,
                                  mask_ratio=self.mask_ratio, amp=self.amp)
        with contextlib.redirect_stdout(io.StringIO()):
            return train_one_epoch(self.handle, loader, self.optimizer, self.device, 0,
                                   self.scaler, _Applied(), args)


def time_runs(run, warmup: int, steps: int, device: torch.device) -> tuple[float, float, float | None]:
    """(seconds of run(warmup), seconds of run(steps) after it, spread), device synchronised;
    the warm-up's time includes any compilation. The timed steps run as two halves, and
    `spread` is how far their rates differ relative to their mean (None for one step): a
    difference between two figures smaller than that is noise."""
    start = time.perf_counter()
    run(warmup)
    sync(device)
    warm = time.perf_counter() - start
    halves = [n for n in (steps // 2, steps - steps // 2) if n]
    seconds = []
    for n in halves:
        begin = time.perf_counter()
        run(n)
        sync(device)
        seconds.append(time.perf_counter() - begin)
    spread = None
    if len(halves) == 2 and all(seconds):
        rates = [n / t for n, t in zip(halves, seconds)]
        spread = abs(rates[0] - rates[1]) / (sum(rates) / 2)
    return warm, sum(seconds), spread


# ---- (c) the schedule average ----------------------------------------------------------------
def schedule_average(ks: list[int], img_per_s: list[float], num_layers: int, t_0: float,
                     how_scale: str) -> dict:
    """Images/s averaged over a FreezeOut run: time per image with k frozen weighted by
    t_k - t_{k-1} (util.flops.freezeout_speedup's weighting). Unmeasured k are interpolated
    linearly in time per image (constant beyond the measured ends)."""
    t = fo.freeze_fractions(num_layers, t_0, how_scale)
    pairs = sorted(zip(ks, img_per_s))
    xs, ys = [k for k, _ in pairs], [1.0 / v for _, v in pairs]

    def time_per_image(k: int) -> float:
        if k <= xs[0]:
            return ys[0]
        if k >= xs[-1]:
            return ys[-1]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= k <= x1:
                return y0 + (y1 - y0) * (k - x0) / (x1 - x0)
        raise AssertionError

    average, previous, weights = 0.0, 0.0, []
    for k in range(num_layers):
        weights.append(t[k] - previous)
        average += (t[k] - previous) * time_per_image(k)
        previous = t[k]
    return {'img_per_s': 1.0 / average, 'weights': weights,
            'interpolated': sorted(set(range(num_layers)) - set(xs))}


def flops_estimate(args: argparse.Namespace, ks: list[int]) -> dict | None:
    if args.model not in flops.SHAPES:
        return None
    shape = dataclasses.replace(flops.SHAPES[args.model], img_size=args.input_size, mask_ratio=args.mask_ratio)
    out = flops.freezeout_speedup(shape, args.t_0, args.how_scale, args.decoder_freeze)
    plain = flops.step_flops(shape, 0, args.decoder_freeze)
    out['speedup_per_k'] = [plain / flops.step_flops(shape, k, args.decoder_freeze) for k in ks]
    return out


# ---- (d) input pipelines ---------------------------------------------------------------------
def repeated_folder(data_path: str, repeat: int, tmp: Path) -> str:
    """The ImageFolder of data_path, its file list repeated `repeat` times (symlinks under tmp)."""
    root = resolve_image_folder(data_path, 'train')
    if repeat <= 1:
        return str(root)
    for class_dir in sorted(class_folders(root)):
        files = sorted(f for f in class_dir.rglob('*') if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)
                       and not any(is_hidden(part) for part in f.relative_to(class_dir).parts))
        target = tmp / 'train' / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for r in range(repeat):
            for i, f in enumerate(files):
                os.symlink(f.resolve(), target / f'r{r:04d}_{i:05d}{f.suffix}')
    return str(tmp / 'train')


def endless_batches(loader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class _Take:
    """A loader (the engine's interface) of the next n batches of a shared iterator."""

    def __init__(self, iterator: Iterator, n: int):
        self.iterator, self.n = iterator, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.iterator)


def steady_state_batches(loader, warmup: int, batches: int) -> tuple[int, int]:
    """(warm-up, timed) batch counts for a loader: the batches its workers prefetched during the
    warm-up are drained first, and at least two rounds of all workers are timed, so the figure
    is the pipeline's steady rate, not the speed of emptying its queue."""
    inner = getattr(loader, 'loader', loader)  # the DataLoader inside a GPU backend, if any
    workers = getattr(inner, 'num_workers', 0) or 0
    prefetched = workers * (getattr(inner, 'prefetch_factor', None) or 0)
    return warmup + prefetched, max(batches, 2 * workers)


def time_loader(loader, warmup: int, batches: int, device: torch.device) -> float:
    """Images/s over `batches` batches (moved to the device, as the engine does) after `warmup`
    (steady_state_batches)."""
    warmup, batches = steady_state_batches(loader, warmup, batches)
    it = endless_batches(loader)
    for _ in range(warmup):
        images, _ = next(it)
        images.to(device, non_blocking=True)
    sync(device)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        images, _ = next(it)
        images = images.to(device, non_blocking=True)
        count += images.shape[0]
    sync(device)
    return count / (time.perf_counter() - start)


def time_end_to_end(args: argparse.Namespace, loader, ks: list[int], device: torch.device) -> dict[str, float]:
    """Images/s of the project step fed by `loader`, for each k frozen (a fresh model, as the
    schedule only freezes forwards)."""
    project = ProjectStep(args, device)
    warmup, batches = steady_state_batches(loader, max(args.warmup, 1), args.steps)
    it = endless_batches(loader)
    rates = {}
    for k in sorted(ks):
        project.set_frozen(k)
        _, seconds, _ = time_runs(lambda n: project.run_loader(_Take(it, n), args.batch_size), warmup, batches,
                                  device)
        rates[str(k)] = batches * args.batch_size / seconds
        warmup = max(args.warmup, 1)  # the workers' prefetched batches were drained by the first k
    return rates


def error_line(e: BaseException) -> str:
    """The line of an error worth a note: its first, or for an error re-raised from a DataLoader
    worker ("Caught ... in DataLoader worker process N" + the worker's traceback) its last."""
    lines = [line for line in str(e).splitlines() if line.strip()] or ['']
    return (lines[-1] if lines[0].startswith('Caught ') else lines[0])[:300]


def loader_label(backend: str, cpu_decode_share: float) -> str:
    """The name of a timed loader in benchmark.json: the backend, plus its CPU decode share if any."""
    return f'{backend} (cpu decode {cpu_decode_share:g})' if cpu_decode_share else backend


def bench_loaders(args: argparse.Namespace, device: torch.device, result: dict, e2e_ks: list[int],
                  save: Callable[[], None]) -> None:
    """(d) and (e) for each backend, into result's loader_img_per_s / loader_setup_s /
    end_to_end_img_per_s, saved after each backend; a backend that fails is noted, not fatal."""
    rates, setup, e2e, notes = (result['loader_img_per_s'], result['loader_setup_s'],
                                result['end_to_end_img_per_s'], result['notes'])
    if not args.data_path:
        return
    if args.gpu_resample != 'bicubic' and set(args.backends) - {'pil'}:
        notes.append(f'gpu / gpu-cache resize crops with --gpu_resample {args.gpu_resample}')
    with tempfile.TemporaryDirectory() as tmp:
        folder = repeated_folder(args.data_path, args.repeat, Path(tmp))
        variants = [(b, share) for b in args.backends for share in (sorted(set(args.cpu_decode_shares)) if b == 'gpu' else [0.0])]
        for kind, share in variants:
            backend = loader_label(kind, share)
            if kind != 'pil' and device.type != 'cuda':
                notes.append(f'loader {backend} skipped: needs a CUDA device (running on {device})')
                log(f'[loader {backend}] skipped: needs a CUDA device')
                continue
            start, refusals = time.perf_counter(), gpu_data._refusals
            try:
                loader = build_loader(kind, folder, args.input_size, args.batch_size, 0, args.num_workers,
                                      device.type == 'cuda', 1, 0, device, args.cache_size, args.decode_ahead, share,
                                      args.gpu_resample)
            except SystemExit as e:
                notes.append(f'loader {backend} skipped: {e}')
                log(f'[loader {backend}] skipped: {e}')
                continue
            except Exception as e:  # e.g. out of memory filling the gpu-cache: note it, time the others
                notes.append(f'loader {backend} failed to build: {type(e).__name__}: {error_line(e)}')
                log(f'[loader {backend}] failed to build: {e!r}')
                continue
            setup[backend] = time.perf_counter() - start
            try:
                rates[backend] = time_loader(loader, max(args.warmup, 1), args.steps, device)
                log(f'[loader {backend}] {rates[backend]:.0f} img/s ({len(loader.dataset)} images, '
                    f'set-up {setup[backend]:.1f}s, {args.num_workers} worker{"s" * (args.num_workers != 1)})')
                if e2e_ks:
                    e2e[backend] = time_end_to_end(args, loader, e2e_ks, device)
                    log(f'[end to end {backend}] ' +
                        ', '.join(f'k={k}: {v:.0f} img/s' for k, v in e2e[backend].items()))
            except Exception as e:  # the step timings already taken are worth more than this backend
                notes.append(f'loader {backend} failed: {type(e).__name__}: {error_line(e)}')
                log(f'[loader {backend}] failed: {e!r}')
            if gpu_data._refusals > refusals:  # its rates are then those of a CPU decode: say so
                notes.append(f'loader {backend}: the batched GPU JPEG decoder refused {gpu_data._refusals - refusals} '
                             f'files, decoded on the CPU instead')
                log(f'[loader {backend}] {notes[-1]}')
            del loader
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            save()


# ---- report ----------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    ref = result['reference_step_img_per_s']
    lines = [f'# Benchmark: {result["model"]}, batch {result["batch_size"]}, {result["input_size"]} px, '
             f'{result["device"]}', '',
             f'amp {result["amp"]}, compile {result["compile"]}, {result["steps"]} timed steps after '
             f'{result["warmup"]} warm-up, {result["date"]}', '',
             '| step | images/s | vs reference |', '|---|---|---|']
    if ref:
        precision = 'fp32 on CPU' if result['device'] == 'cpu' else 'fp16 + GradScaler'
        lines.append(f'| upstream reference ({precision}, grad norm, 4x3 HOG, item() per step) | {ref:,.0f} | 1.00x |')
    for k, v in zip(result['ks'], result['freeze_img_per_s']):
        lines.append(f'| project, {k} layers frozen | {v:,.0f} | {v / ref:.2f}x |' if ref else
                     f'| project, {k} layers frozen | {v:,.0f} | |')
    avg = result['schedule_average_img_per_s']
    sched = f'{result["how_scale"]} t_0={result["t_0"]}'
    lines.append(f'| FreezeOut schedule average ({sched}) | {avg:,.0f} | ' + (f'{avg / ref:.2f}x |' if ref else '|'))
    if result['flops_estimate']:
        f = result['flops_estimate']
        lines += ['', f'FLOP estimate ({sched}): {f["plain_gflops_per_image"]:.1f} GFLOP/image plain, '
                      f'{f["average_gflops_per_image"]:.1f} on average, speedup {f["speedup"]:.2f}x '
                      f'(measured schedule average over project k=0: '
                      f'{result["schedule_speedup_vs_k0"] or float("nan"):.2f}x)']
    if result.get('warmup_s'):  # absent from files of older versions
        lines += ['', 'Warm-up per k (untimed' + ('; compilation included' if result['compile'] else '') + '): ' +
                  ', '.join(f'k={k} {w:.1f} s' for k, w in zip(result['ks'], result['warmup_s']))]
    if noise_line(result):
        lines += ['', noise_line(result)]
    epoch = result['projected_epoch_s']
    lines += ['', f'Projected epoch of {result["epoch_images"]:,} images on this device: ' +
              ', '.join(f'{k} {v / 60:.1f} min' for k, v in epoch.items() if v)]
    if result['loader_img_per_s']:
        e2e = result['end_to_end_img_per_s']
        e2e_ks = sorted({int(k) for v in e2e.values() for k in v})
        synthetic = dict(zip(result['ks'], result['freeze_img_per_s']))
        head = ''.join(f' step on its batches, k={k} |' for k in e2e_ks)
        lines += ['', f'| input backend | loader alone, images/s | set-up s |{head}',
                  '|---|---|---|' + '---|' * len(e2e_ks)]
        for backend, v in result['loader_img_per_s'].items():
            cells = ''
            for k in e2e_ks:
                got = e2e.get(backend, {}).get(str(k))
                ratio = f' ({got / synthetic[k]:.0%} of synthetic)' if got and k in synthetic else ''
                cells += f' {got:,.0f}{ratio} |' if got else ' |'
            lines.append(f'| {backend} | {v:,.0f} | {result["loader_setup_s"].get(backend, 0):.1f} |{cells}')
    if result['notes']:
        lines += [''] + [f'- {n}' for n in result['notes']]
    return '\n'.join(lines) + '\n'


def plot(result: dict, path: Path, compiled: dict | None = None) -> None:
    """images/s vs frozen layers with the reference line; `compiled` (a --compile run's
    benchmark.json) adds its points and schedule average."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    eager = ' (eager)' if compiled else ''
    ax.plot(result['ks'], result['freeze_img_per_s'], 'o-', label=f'project step{eager}, k layers frozen')
    if result['reference_step_img_per_s']:
        ax.axhline(result['reference_step_img_per_s'], color='gray', ls='--', label='upstream step')
    ax.axhline(result['schedule_average_img_per_s'], color='tab:green', ls=':',
               label=f'schedule average{eager} ({result["how_scale"]}, t_0={result["t_0"]})')
    if compiled:
        ax.plot(compiled['ks'], compiled['freeze_img_per_s'], 's--', color='tab:red',
                label='project step under --compile')
        ax.axhline(compiled['schedule_average_img_per_s'], color='tab:red', ls=':',
                   label='schedule average under --compile')
    ax.set_xlabel('frozen layers k (0 = none; 1 = patch embedding; k = blocks 0..k-2 too)')
    ax.set_ylabel('images/s')
    ax.set_title(f'{result["model"]}, batch {result["batch_size"]}, {result["device"]}')
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- targets (measure_gpu.sh) ------------------------------------------------------------------
TARGETS = {'project_k0_vs_reference': 1.7, 'schedule_average_vs_reference': 2.2,
           'jpeg_loader_vs_schedule_average': 1.0, 'real_epoch_vs_synthetic_step': 0.9}
JPEG_BACKENDS = ('pil', 'gpu')  # decode every step (gpu-cache decodes once)


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _verdict(ratio: float | None, needed: float) -> str:
    if ratio is None:
        return 'not measured'
    return 'met' if ratio >= needed else f'missed by {1 - ratio / needed:.0%}'


def check_targets(folder: Path) -> str:
    """Markdown summary of measure_gpu.sh's results in `folder` against the performance targets
    (issue 6), plus the figures derived from them (linear 0.5 schedule average from the same
    per-k timings, end-to-end rates, the gpu backend with and without decoding ahead)."""
    main_run = _load_json(folder / 'b16_224' / 'benchmark.json')
    compiled = _load_json(folder / 'b16_224_compile' / 'benchmark.json')
    inline = _load_json(folder / 'b16_224_decode_inline' / 'benchmark.json')
    small_step = _load_json(folder / 'imagenette_step' / 'benchmark.json')
    log = folder / 'imagenette_run' / 'log.txt'
    epochs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    lines = ['# Performance targets', '']
    if main_run is None:
        return '\n'.join(lines + ['stage 1 wrote no benchmark.json: nothing to check', ''])
    lines += [f'{main_run["device"]}, {main_run["model"]}, batch {main_run["batch_size"]}, '
              f'{main_run["input_size"]} px, amp {main_run["amp"]}, {main_run["date"]}', '',
              '| target | measured | needed | verdict |', '|---|---|---|---|']
    ref, avg = main_run['reference_step_img_per_s'], main_run['schedule_average_img_per_s']
    rates = dict(zip(main_run['ks'], main_run['freeze_img_per_s']))
    k0 = rates.get(0)
    sched = f'{main_run["how_scale"]} t_0={main_run["t_0"]}'
    rows = []
    if ref and k0:
        rows.append(('project step, nothing frozen, vs upstream reference', k0 / ref,
                     f'{k0:,.0f} vs {ref:,.0f} img/s', TARGETS['project_k0_vs_reference']))
        rows.append((f'FreezeOut schedule average ({sched}) vs upstream reference', avg / ref,
                     f'{avg:,.0f} vs {ref:,.0f} img/s', TARGETS['schedule_average_vs_reference']))
    compiled_rates = dict(zip(compiled['ks'], compiled['freeze_img_per_s'])) if compiled else {}
    if ref and compiled_rates.get(0):
        c0, cavg = compiled_rates[0], compiled['schedule_average_img_per_s']
        measured = ', '.join(str(k) for k in compiled['ks'])
        cut = f'; cut short, k = {compiled["partial"]} not measured' if compiled.get('partial') else ''
        rows.append(('project step under --compile, nothing frozen, vs upstream reference', c0 / ref,
                     f'{c0:,.0f} vs {ref:,.0f} img/s', TARGETS['project_k0_vs_reference']))
        rows.append((f'FreezeOut schedule average under --compile ({compiled["how_scale"]} t_0={compiled["t_0"]}; '
                     f'k = {measured} measured, the others from them{cut}) vs upstream reference', cavg / ref,
                     f'{cavg:,.0f} vs {ref:,.0f} img/s', TARGETS['schedule_average_vs_reference']))
    jpeg = {b: v for b, v in main_run['loader_img_per_s'].items() if b.split(' (')[0] in JPEG_BACKENDS}
    if jpeg:
        best = max(jpeg, key=jpeg.get)
        rows.append((f'fastest JPEG backend ({best}, loader alone) vs schedule average', jpeg[best] / avg,
                     f'{jpeg[best]:,.0f} vs {avg:,.0f} img/s', TARGETS['jpeg_loader_vs_schedule_average']))
    if small_step and epochs:
        synthetic, real = small_step['freeze_img_per_s'][0], epochs[-1]['train_images_per_s']
        rows.append((f'real run_pretrain.py epoch ({len(epochs)} of {len(epochs)}) vs synthetic step, '
                     f'{small_step["input_size"]} px', real / synthetic,
                     f'{real:,.0f} vs {synthetic:,.0f} img/s', TARGETS['real_epoch_vs_synthetic_step']))
    for name, ratio, figures, needed in rows:
        shown = f'{ratio:.0%}' if needed <= 1 else f'{ratio:.2f}x'
        need = f'>= {needed:.0%}' if needed <= 1 else f'>= {needed}x'
        lines.append(f'| {name} | {shown} ({figures}) | {need} | {_verdict(ratio, needed)} |')
    if not rows:
        lines.append('| (no target could be computed from these results) | | | |')
    problems = [n for n in main_run.get('notes', []) if n.startswith('loader ')]
    for name, run in (('stage 1 (eager step)', main_run), ('the compiled step', compiled)):
        if run and run.get('partial'):  # its schedule average holds the last timed k for the rest
            problems.append(f'{name} was cut short: k = {run["partial"]} not measured')
    if problems:  # e.g. a failed gpu backend, which would leave pil as "the fastest JPEG backend"
        lines += [''] + [f'- {n}' for n in problems]
    num_layers = len(main_run.get('schedule_weights') or main_run['ks'])  # one weight per layer, whatever was timed
    linear = schedule_average(main_run['ks'], main_run['freeze_img_per_s'], num_layers, 0.5, 'linear') \
        if main_run['ks'] == list(range(num_layers)) else None
    if linear:
        vs = f' ({linear["img_per_s"] / ref:.2f}x the reference)' if ref else ''
        lines += ['', f'Schedule average for linear t_0=0.5, from the same per-k timings: '
                      f'{linear["img_per_s"]:,.0f} img/s{vs}.']
    if compiled and compiled.get('warmup_s'):  # what the compiled step's speed costs up front, per graph
        eager = dict(zip(main_run['ks'], main_run.get('warmup_s') or []))
        lines += ['', 'Warm-up of the compiled step (compilation included) per k: ' + ', '.join(
            f'k={k} {w:.0f} s' + (f' (eager {eager[k]:.1f} s)' if k in eager else '')
            for k, w in zip(compiled['ks'], compiled['warmup_s'])) + '.']
    e2e = main_run.get('end_to_end_img_per_s') or {}
    if e2e:
        lines += ['', 'The step fed by each backend\'s real batches (end to end) vs the synthetic-input step:', '',
                  '| backend | k frozen | end to end img/s | synthetic img/s | share |', '|---|---|---|---|---|']
        for backend, by_k in e2e.items():
            for k, v in by_k.items():
                syn = rates.get(int(k))
                lines.append(f'| {backend} | {k} | {v:,.0f} | {syn:,.0f} | {v / syn:.0%} |' if syn else
                             f'| {backend} | {k} | {v:,.0f} | | |')
    for name, run in (('Eager step', main_run), ('Compiled step', compiled)):
        if run and noise_line(run):
            lines += ['', f'{name}. {noise_line(run)}']
    if compiled and compiled_rates:  # eager and compiled steps in one figure, beside summary.md
        try:
            plot(main_run, folder / 'targets_freeze.png', compiled)
            lines += ['', '![images/s vs frozen layers, eager and compiled](targets_freeze.png)']
        except (OSError, ImportError) as e:  # e.g. a read-only folder: the table matters more than the figure
            lines += ['', f'(no figure: {type(e).__name__}: {e})']
    if inline and 'gpu' in inline['loader_img_per_s']:
        ahead = main_run['loader_img_per_s'].get('gpu')
        lines += ['', f'gpu backend decoding on the training thread (--decode_ahead 0): loader alone '
                      f'{inline["loader_img_per_s"]["gpu"]:,.0f} img/s'
                  + (f' (vs {ahead:,.0f} with --decode_ahead {main_run.get("decode_ahead")})' if ahead else '')
                  + ''.join(f'; end to end k={k}: {v:,.0f} img/s'
                            + (f' (vs {e2e["gpu"][k]:,.0f})' if k in e2e.get('gpu', {}) else '')
                            for k, v in inline.get('end_to_end_img_per_s', {}).get('gpu', {}).items())]
    return '\n'.join(lines) + '\n'


def step_result(args: argparse.Namespace, command: list[str], device_name: str, ref: float | None, ks: list[int],
                rates: list[float], warmup_s: list[float], num_layers: int, notes: list[str],
                spreads: tuple[float | None, list[float | None]] = (None, [])) -> dict:
    """benchmark.json's content from the step timings (the loader entries start empty)."""
    avg = schedule_average(ks, rates, num_layers, args.t_0, args.how_scale)
    notes = list(notes)
    if avg['interpolated']:
        notes.append(f'schedule average interpolates k = {avg["interpolated"]} (not measured)')
    k0 = rates[ks.index(0)] if 0 in ks else None
    return {
        'device': device_name, 'model': args.model, 'batch_size': args.batch_size, 'input_size': args.input_size,
        'amp': args.amp, 'compile': args.compile, 'steps': args.steps, 'warmup': args.warmup,
        'reference_step_img_per_s': ref,
        'ks': ks, 'freeze_img_per_s': rates,
        'warmup_s': warmup_s,  # per k: the untimed warm-up steps, compilation included under --compile
        # how far the two halves of the timed steps differed (relative): the timing noise
        'reference_spread': spreads[0], 'freeze_spread': spreads[1],
        'how_scale': args.how_scale, 't_0': args.t_0, 'decoder_freeze': args.decoder_freeze,
        'schedule_average_img_per_s': avg['img_per_s'], 'schedule_weights': avg['weights'],
        'speedup_vs_reference': {'project_k0': k0 / ref if ref and k0 else None,
                                 'schedule_average': avg['img_per_s'] / ref if ref else None},
        'schedule_speedup_vs_k0': avg['img_per_s'] / k0 if k0 else None,
        'epoch_images': args.epoch_images,
        'projected_epoch_s': {'reference': args.epoch_images / ref if ref else None,
                              'project_k0': args.epoch_images / k0 if k0 else None,
                              'schedule_average': args.epoch_images / avg['img_per_s']},
        'flops_estimate': flops_estimate(args, ks),
        'loader_img_per_s': {}, 'loader_setup_s': {}, 'end_to_end_img_per_s': {}, 'decode_ahead': args.decode_ahead,
        'cpu_decode_shares': args.cpu_decode_shares, 'gpu_resample': args.gpu_resample,
        'data_path': args.data_path, 'repeat': args.repeat, 'num_workers': args.num_workers,
        'notes': notes, 'torch': torch.__version__, 'command': command,
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
    }


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.check_targets:
        if not Path(args.check_targets).is_dir():
            raise SystemExit(f'error: --check_targets {args.check_targets} is not a folder (measure_gpu.sh\'s '
                             f'results, e.g. an unpacked measure_gpu.tgz)')
        print(check_targets(Path(args.check_targets)), end='')
        return {}
    device = resolve_device_and_amp(args)
    check_number_flags(args)
    if min(args.steps, args.batch_size) < 1 or min(args.warmup, args.decode_ahead) < 0 or args.repeat < 1:
        raise SystemExit('error: --steps and --batch_size must be at least 1, --warmup and --decode_ahead at least 0, '
                         '--repeat at least 1')
    for share in args.cpu_decode_shares:
        gpu_data.check_cpu_decode_share('gpu', share)
    fo.validate(args.t_0, args.how_scale, args.decoder_freeze, 0, 1)
    models_mim.check_model(args.model, args.input_size)
    num_layers = flops.SHAPES[args.model].depth + 1  # FreezeOut's layers: the patch embedding and each block
    ks = sorted(set(args.ks)) if args.ks else list(range(num_layers))
    e2e_ks = [0, num_layers - 1] if args.e2e_ks is None else sorted(set(args.e2e_ks))
    for flag, values in (('--ks', ks), ('--e2e_ks', e2e_ks)):
        if values and (values[0] < 0 or values[-1] >= num_layers):  # --e2e_ks alone: none
            raise SystemExit(f'error: {flag} must lie in 0..{num_layers - 1} for {args.model}')
    if args.data_path:  # before the step timings, not after them
        resolve_image_folder(args.data_path, 'train')
    out = Path(args.out)
    check_output_folder(out, f'--out {out}')  # also before the timings, whose results it is to hold
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    log(f'benchmark: {args.model}, batch {args.batch_size}, {args.input_size}px on {device_name}, amp {args.amp}, '
        f'{args.warmup} warm-up + {args.steps} timed steps')
    notes: list[str] = []
    imgs = synthetic_images(args.batch_size, args.input_size, device)
    images = args.steps * args.batch_size

    project = ProjectStep(args, device)

    ref = ref_spread = None
    if not args.skip_reference:
        reference = ReferenceStep(args.model, args.input_size, device, args.mask_ratio)
        _, seconds, ref_spread = time_runs(lambda n: [reference.step(imgs) for _ in range(n)], args.warmup,
                                           args.steps, device)
        ref = images / seconds
        log(f'[reference] upstream step: {ref:.1f} img/s{spread_text(ref_spread)}')
        reference = None  # frees its model and optimizer state
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    if device.type != 'cuda' and not args.skip_reference:
        notes.append('CPU: the reference runs in fp32 without GradScaler (no fp16 autocast on CPU)')

    def save(res: dict) -> None:  # after each k, after the step timings and after each backend
        write_text_atomic(out / 'benchmark.json', json.dumps(res, indent=1))
        write_text_atomic(out / 'benchmark.md', markdown(res))

    command = list(sys.argv) if argv is None else ['benchmark.py', *argv]
    rates, warmup_s, spreads = [], [], []
    for k in ks:
        project.set_frozen(k)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)  # the peak of this k, not the largest so far
        warm, seconds, spread = time_runs(lambda n: project.run(imgs, n), args.warmup, args.steps, device)
        rates.append(images / seconds)
        warmup_s.append(warm)
        spreads.append(spread)
        mem = (f', peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB'
               if device.type == 'cuda' else '')
        log(f'[project] k={k:2d} frozen, live taps {project.model.live_taps}: {rates[-1]:.1f} img/s{mem} '
            f'(warm-up {warm:.1f} s){spread_text(spread)}')
        if len(rates) < len(ks):  # a run cut short (e.g. by a time limit while compiling) keeps what it measured
            partial = step_result(args, command, device_name, ref, ks[:len(rates)], rates, warmup_s, num_layers,
                                  notes, (ref_spread, spreads))
            partial['partial'] = ks[len(rates):]  # the ks not timed yet; absent from a finished run's file
            partial['notes'].append(f'partial: k = {partial["partial"]} not measured yet')
            save(partial)
    project = None
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    result = step_result(args, command, device_name, ref, ks, rates, warmup_s, num_layers, notes,
                         (ref_spread, spreads))
    save(result)
    bench_loaders(args, device, result, e2e_ks, lambda: save(result))
    save(result)
    plot(result, out / 'benchmark_freeze.png')
    log('\n' + markdown(result))
    log(f'wrote {out / "benchmark.json"}, {out / "benchmark.md"}, {out / "benchmark_freeze.png"}')
    failed = [n for n in result['notes'] if n.startswith('loader ') and ' failed' in n.split(':')[0]]
    if failed:  # the step timings are written; a script or scheduler still sees that a part failed
        raise SystemExit(f'error: {"; ".join(failed)} (the other measurements are in {out / "benchmark.json"})')
    return result


if __name__ == '__main__':
    util.startup.run_tool(main)
