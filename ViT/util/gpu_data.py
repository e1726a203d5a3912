"""GPU input pipelines for pretraining (run_pretrain.py --data_backend gpu | gpu-cache).

On a 16-core-per-GPU server the PIL pipeline (util.data) delivers about 1,000 images/s, slower
than the model step (design.md section 4). Two backends move the work to the GPU:

gpu        DataLoader workers read the JPEG files (bytes); the batch is decoded on the GPU
           in one nvjpeg call and cropped, flipped and normalised there in one batched resample,
           by a background thread on its own CUDA stream, `decode_ahead` batches in advance.
           With `cpu_decode_share` s > 0 the workers also decode the first round(s * B) files
           of each batch on the CPU (full size, libjpeg): the CPU cores add their decoding rate
           to nvjpeg's. Only the decoder differs; crops and flips are drawn as before.
gpu-cache  for data sets that fit in GPU memory: every image is decoded once (PIL, CPU),
           resized so its shorter side is `cache_size`, centre-cropped to a square and kept on
           the GPU as one uint8 tensor; each step gathers its batch and augments it on the GPU.

The augmentation is upstream's RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)) + horizontal
flip + ImageNet normalisation, done for the whole batch by one `grid_sample` whose per-sample
affine grid maps the output square onto that sample's crop box (a flip negates the x scale).
Crop boxes have torchvision's RandomResizedCrop.get_params distribution (`sample_crop_boxes`:
the 10 tries of every sample drawn at once, the first valid one kept, else the centre crop).
Differences from the PIL pipeline: no antialiasing when a crop is shrunk (grid_sample samples,
PIL filters over the whole footprint), grid_sample's cubic kernel has A = -0.75 (PIL's -0.5,
slightly softer), bicubic taps at a crop's edge read the pixels just outside it (PIL clamps at
the crop), and libjpeg/nvjpeg decodes differ by a grey level or so. With --gpu_resample pil
(mode 'pil') only the last remains: the crop is resized as PIL does it, by batched matmuls with
per-sample weight matrices (`pil_resample_weights`).

Randomness: one CPU generator per batch, seeded from (seed, epoch, batch index, rank), so an
interrupted run resumes with the same inputs; a batch draws its crop boxes first, then its flips.
The augmentation core takes any device (tests run it on CPU); only `build_loader` insists on
CUDA for the GPU backends.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
import torchvision.transforms.functional as TF
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode

from util.data import (CROP_RATIO, CROP_SCALE, ClassFolder, DataLayoutError, EpochSampler, UnreadableImage,
                       build_pretrain_loader, check_num_workers, load_rgb, normalize_uint8_range, resolve_image_folder,
                       sample_crop_boxes, sample_flips)
from util.flags import BACKENDS, GPU_RESAMPLE_CHOICES

# pixels of one padded canvas (batch x height x width); larger batches are resampled in groups
MAX_CANVAS_PIXELS = 256 * 512 * 512


# ---- randomness ------------------------------------------------------------------------------
def batch_seed(seed: int, epoch: int, batch_index: int, rank: int) -> int:
    """Seed of one batch's augmentation generator."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_000_007 + batch_index) % (2 ** 63)


def batch_generator(seed: int, epoch: int, batch_index: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(batch_seed(seed, epoch, batch_index, rank))


# ---- resampling ------------------------------------------------------------------------------
def crop_grids(boxes: torch.Tensor, flips: torch.Tensor, canvas_h: int, canvas_w: int,
               out_size: int) -> torch.Tensor:
    """grid_sample grids (B, S, S, 2) (align_corners=False) that map the output square onto each
    box of a (canvas_h, canvas_w) canvas: output pixel j samples the box at
    left + (j + 0.5) * w / S (pixel-edge coordinates), mirrored when flipped."""
    b = boxes.to(torch.float64)
    top, left, h, w = b.unbind(1)
    sign = 1.0 - 2.0 * flips.to(torch.float64)
    ax, bx = sign * w / canvas_w, (2 * left + w) / canvas_w - 1
    ay, by = h / canvas_h, (2 * top + h) / canvas_h - 1
    u = (torch.arange(out_size, device=boxes.device, dtype=torch.float64) * 2 + 1) / out_size - 1
    gx = (ax[:, None] * u + bx[:, None]).float()  # (B, S) along the width
    gy = (ay[:, None] * u + by[:, None]).float()  # (B, S) along the height
    n = boxes.shape[0]
    return torch.stack([gx[:, None, :].expand(n, out_size, out_size),
                        gy[:, :, None].expand(n, out_size, out_size)], dim=-1)


def _pil_cubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; grid_sample's has -0.75)."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = ((x - 5) * x + 8) * x * -0.5 + 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def pil_resample_weights(start: torch.Tensor, length: torch.Tensor, canvas_len: int, out_size: int) -> torch.Tensor:
    """(B, S, canvas_len) float32: row j holds the weights of canvas pixels 0 .. canvas_len - 1 in
    output pixel j of PIL's bicubic resize of the span [start_i, start_i + length_i): the kernel
    is widened by the scale when shrinking (antialiasing), taps stay inside the span (PIL crops,
    then resizes), and each row sums to 1. start, length: (B,) integers."""
    start, length = start.float(), length.float()
    scale = length / out_size  # (B,) input pixels per output pixel
    widen = scale.clamp(min=1.0)
    centre = start[:, None] + (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]  # (B, S)
    pixel = torch.arange(canvas_len, device=start.device) + 0.5  # (X,) pixel centres
    weights = _pil_cubic((pixel[None, None, :] - centre[:, :, None]) / widen[:, None, None])  # (B, S, X)
    inside = (pixel[None, :] > start[:, None]) & (pixel[None, :] < (start + length)[:, None])  # (B, X)
    weights = weights * inside[:, None, :]
    return weights / weights.sum(-1, keepdim=True)


def pil_height_first(boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B,) bool on the host: the crops that the installed Pillow resizes height first. PIL
    resizes in two passes, each rounded to 8 bits, so the order shows in the pixels. Pillow
    13.0 goes height first when h > S and h - S > 2 (w - S) (found by comparing its output with
    both orders over random sizes); the earlier Resample.c sources always go width first, and
    the installed one is probed (_pillow_goes_height_first)."""
    h, w = boxes[:, 2].cpu(), boxes[:, 3].cpu()
    if not _pillow_goes_height_first():
        return torch.zeros_like(h, dtype=torch.bool)
    return (h > out_size) & (h + out_size > 2 * w)


@functools.lru_cache(maxsize=1)
def _pillow_goes_height_first() -> bool:
    """Probes the installed Pillow once: a noise image whose two pass orders differ by several
    grey levels, resized as a crop 80 high and 40 wide to 32 x 32."""
    from PIL import Image
    noise = torch.randint(0, 256, (3, 80, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pil = Image.fromarray(noise.permute(1, 2, 0).numpy()).resize((32, 32), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    box = torch.tensor([[0, 0, 80, 40]])
    height_first = _pil_resized_crop(noise[None].float(), box, torch.tensor([False]), 32, torch.tensor([True]))[0]
    return bool((height_first - expected).abs().max() <= 1)


def _pil_resized_crop(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: int,
                      height_first: torch.Tensor) -> torch.Tensor:
    """The pil backend's resized crop as batched matmuls, (B, C, H, W) -> (B, C, S, S): PIL's
    two passes, each rounded to 8 bits, width first except where `height_first` ((B,) bool on
    the host, pil_height_first)."""
    top, left, h, w = boxes.unbind(1)
    across = pil_resample_weights(left, w, x.shape[-1], out_size)  # (B, S, W)
    across = torch.where(flips.bool()[:, None, None], across.flip(1), across).transpose(1, 2)[:, None]  # (B,1,W,S)
    down = pil_resample_weights(top, h, x.shape[-2], out_size)[:, None]  # (B, 1, S, H)

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.round_().clamp_(0, 255)

    if not height_first.any():
        return rounded(torch.matmul(down, rounded(torch.matmul(x, across))))
    out = torch.empty((x.shape[0], x.shape[1], out_size, out_size), dtype=x.dtype, device=x.device)
    for first, group in ((True, height_first.nonzero()[:, 0]), (False, (~height_first).nonzero()[:, 0])):
        if len(group):
            i = to_device(group, x.device)
            a, d, xi = across.index_select(0, i), down.index_select(0, i), x.index_select(0, i)
            out.index_copy_(0, i, rounded(torch.matmul(rounded(torch.matmul(d, xi)), a)) if first
                            else rounded(torch.matmul(d, rounded(torch.matmul(xi, a)))))
    return out


def resized_crop_batch(canvas: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: int,
                       mode: str = 'bicubic') -> torch.Tensor:
    """Crop box i of canvas[i], resize it to out_size x out_size, flip where asked, for the
    whole batch at once. Float32 output in the canvas' value range.
    'bicubic' / 'bilinear': one grid_sample, not antialiased, not clamped; taps outside the
    canvas repeat its border pixels. 'pil': the pil backend's pixels (PIL's antialiased
    bicubic on the crop, 8-bit rounding, the installed Pillow's pass order), see _pil_resized_crop."""
    x = canvas if canvas.is_floating_point() else canvas.float()
    if mode == 'pil':
        return _pil_resized_crop(x, to_device(boxes, x.device), to_device(flips, x.device), out_size,
                                 pil_height_first(boxes, out_size))
    boxes, flips = to_device(boxes, x.device), to_device(flips, x.device)
    grid = crop_grids(boxes, flips, x.shape[-2], x.shape[-1], out_size)
    return F.grid_sample(x, grid, mode=mode, padding_mode='border', align_corners=False)


def make_canvas(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, h_i, w_i) images -> (B, C, max h, max w), each at the top left, the rest filled by
    repeating its last column and row (so resampling at its right/bottom edge sees its own
    border, as when it is resampled alone).

    One gather for the batch, not a few copies per image: canvas pixel (y, x) of image i is its
    pixel (min(y, h_i - 1), min(x, w_i - 1)). A per-image loop costs 3 kernel launches an image
    from the decode thread, which shares the GIL with the training thread's launches."""
    c, device = images[0].shape[0], images[0].device
    heights = [int(im.shape[-2]) for im in images]
    widths = [int(im.shape[-1]) for im in images]
    hmax, wmax = max(heights), max(widths)
    flat = torch.cat([im.reshape(c, -1) for im in images], dim=1)  # (C, sum of h_i * w_i)
    dtype = torch.int32 if flat.shape[1] < 2 ** 31 else torch.int64  # index_select takes both
    starts = [0]
    for h, w in zip(heights[:-1], widths[:-1]):
        starts.append(starts[-1] + h * w)
    h, w, start = to_device(torch.tensor([heights, widths, starts], dtype=dtype), device)  # (B,) each
    y = torch.minimum(torch.arange(hmax, dtype=dtype, device=device)[None, :], h[:, None] - 1)  # (B, H)
    x = torch.minimum(torch.arange(wmax, dtype=dtype, device=device)[None, :], w[:, None] - 1)  # (B, W)
    index = start[:, None, None] + y[:, :, None] * w[:, None, None] + x[:, None, :]  # (B, H, W)
    canvas = flat.index_select(1, index.flatten()).view(c, len(images), hmax, wmax)  # (C, B, H, W)
    return canvas.transpose(0, 1).contiguous()


def plan_canvas_groups(sizes: Sequence[tuple[int, int]], max_pixels: int = MAX_CANVAS_PIXELS) -> list[list[int]]:
    """Split images (h, w) into groups, by increasing area, whose canvas (count x max h x
    max w) stays within max_pixels (a group always has at least one image)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i))
    groups, current, hmax, wmax = [], [], 0, 0
    for i in order:
        h, w = sizes[i]
        nh, nw = max(hmax, h), max(wmax, w)
        if current and (len(current) + 1) * nh * nw > max_pixels:
            groups.append(current)
            current, nh, nw = [], h, w
        current.append(i)
        hmax, wmax = nh, nw
    if current:
        groups.append(current)
    return groups


def resized_crop_list(images: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
                      out_size: int, mode: str = 'bicubic', max_canvas_pixels: int = MAX_CANVAS_PIXELS
                      ) -> torch.Tensor:
    """resized_crop_batch for images of different sizes: padded into canvases (one per group of
    plan_canvas_groups) and resampled group by group."""
    device = images[0].device
    boxes, flips = boxes.cpu(), flips.cpu()  # indexed on the host, sent per group without a sync
    out = torch.empty((len(images), images[0].shape[0], out_size, out_size), dtype=torch.float32, device=device)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    for group in plan_canvas_groups(sizes, max_canvas_pixels):
        idx = torch.tensor(group)
        canvas = make_canvas([images[i] for i in group])
        out.index_copy_(0, to_device(idx, device), resized_crop_batch(canvas, boxes[idx], flips[idx], out_size, mode))
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without blocking the host: a plain .to() from pageable memory
    waits for the copy (and so for all queued GPU work); from pinned memory it does not."""
    if t.device == device or device.type != 'cuda':
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def augment_images(images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator, out_size: int,
                   scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO,
                   mode: str = 'bicubic', max_canvas_pixels: int = MAX_CANVAS_PIXELS) -> torch.Tensor:
    """Pretraining augmentation of a batch of uint8 images (a (B, 3, H, W) tensor, or a list of
    (3, h_i, w_i) tensors): RandomResizedCrop + horizontal flip + normalisation, on the images'
    device. Returns float32 (B, 3, out_size, out_size)."""
    if torch.is_tensor(images):
        n, _, height, width = images.shape
        boxes = sample_crop_boxes([height] * n, [width] * n, generator, scale, ratio)
        flips = sample_flips(n, generator)
        out = resized_crop_batch(images, boxes, flips, out_size, mode)
    else:
        heights = [int(im.shape[-2]) for im in images]
        widths = [int(im.shape[-1]) for im in images]
        boxes = sample_crop_boxes(heights, widths, generator, scale, ratio)
        flips = sample_flips(len(images), generator)
        out = resized_crop_list(images, boxes, flips, out_size, mode, max_canvas_pixels)
    return normalize_uint8_range(out)


# ---- backend: gpu (workers read bytes, GPU decodes) -------------------------------------------
def _check_enough(dataset, root, batch_size: int, world_size: int) -> None:
    if len(dataset) < batch_size * world_size:
        raise DataLayoutError(f'{root} has {len(dataset)} images, fewer than one batch per process '
                              f'({batch_size} x {world_size}); lower --batch_size')


class JpegBytesFolder(ClassFolder):
    """ImageFolder whose items are the raw file bytes (uint8 1-D tensors); keys are (epoch, index)
    pairs from EpochSampler or plain indices."""

    def __init__(self, root: str | Path):
        super().__init__(root, loader=read_file)

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        path, target = self.samples[index]
        try:  # an empty file or a dangling link: an error naming it, as the pil backend's
            data = read_file(path)
        except (RuntimeError, OSError) as e:
            parts = str(e).split(', ', 2)  # 'read_file, <source file>:<line>, <reason>'
            reason = parts[2] if len(parts) == 3 and parts[0] == 'read_file' else e
            raise UnreadableImage(f'cannot decode {path}: {reason}') from None
        # read_file's storage is file-backed and cannot be sent to the main process through
        # shared memory (the worker's queue fails on it); a plain copy can
        return data.clone(), target, path


def decode_rgb(data: torch.Tensor, name: str = 'an image') -> torch.Tensor:
    """File bytes -> RGB uint8 (3, h, w) on the CPU. What torchvision's decoder cannot read
    (BMP, TIFF, ...) or reads as 16 bits goes through the pil backend's loader, so that every
    backend sees the same pixels (PIL clips 16-bit values rather than scaling them). A file that
    cannot be decoded at all is an error that names it."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image
    except RuntimeError:
        pass
    return TF.pil_to_tensor(load_rgb(name, data.numpy().tobytes()))


def collate_bytes(batch, cpu_decode_share: float = 0.0):
    """[(bytes, target, path)] -> (packed, lengths, pixels, shapes, targets, names), in batch
    order: the first k = round(cpu_decode_share * B) files decoded here (RGB uint8, full size),
    the rest left as bytes for the GPU.
      packed: uint8, the B - k undecoded files end to end; lengths: int64 (B - k,)
      pixels: uint8, the k decoded (3, h, w) images flattened end to end; shapes: int64 (k, 2)
      targets: int64 (B,); names: the B - k undecoded files' paths (for error messages)
    One tensor per kind for the whole batch: a worker hands every tensor over through its own
    shared-memory file descriptor: receiving 256 of them took 77 ms per batch against 10 ms
    packed (2 workers, 2-core CPU), and 4 batches in flight per worker can pass a 1,024
    open-file limit."""
    data, names = [b[0] for b in batch], [b[2] for b in batch]
    k = round(cpu_decode_share * len(data))
    decoded = [decode_rgb(d, name) for d, name in zip(data[:k], names[:k])]
    rest = data[k:]
    return (torch.cat(rest) if rest else torch.empty(0, dtype=torch.uint8),
            torch.tensor([d.numel() for d in rest], dtype=torch.int64),
            torch.cat([im.flatten() for im in decoded]) if decoded else torch.empty(0, dtype=torch.uint8),
            torch.tensor([im.shape[1:] for im in decoded], dtype=torch.int64).view(k, 2),
            torch.tensor([b[1] for b in batch], dtype=torch.int64), names[k:])


def split_bytes(packed: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """collate_bytes' packed bytes -> one 1-D uint8 view per file."""
    return list(torch.split(packed, lengths.tolist()))


def split_pixels(pixels: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """collate_bytes' packed pixels -> one (3, h, w) uint8 view per image (on pixels' device)."""
    sizes = [(int(h), int(w)) for h, w in shapes.tolist()]
    return [flat.view(3, h, w) for flat, (h, w) in zip(torch.split(pixels, [3 * h * w for h, w in sizes]), sizes)]


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and bytes(data[:3].tolist()) == b'\xff\xd8\xff'


_STREAMS: dict[tuple[str, torch.device], torch.cuda.Stream] = {}
_refusals = 0  # JPEG files the batched decoder refused even alone (decoded on the CPU instead)


def _stream(role: str, device: torch.device) -> torch.cuda.Stream:
    """One stream per role and device for the whole process. torch.cuda.Stream() hands out the
    streams of a small shared pool in turn (torchvision's decoder takes one of them too), so a
    stream made anew per epoch could be one already in use. The decoder's stream comes from the
    high-priority pool, which nothing else here draws from: it must differ from every stream that
    reads decoded images (see decode_batch)."""
    key = (role, device)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device, priority=-1 if role == 'decode' else 0)
    return _STREAMS[key]


def decode_batch(data: Sequence[torch.Tensor], device: torch.device | str,
                 names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """File bytes -> RGB uint8 (3, h, w) tensors on `device`: JPEGs in one batched
    decode_jpeg call (nvjpeg on CUDA); other formats, and JPEGs the batched decoder refuses
    (e.g. CMYK; found by splitting the batch), one by one on the CPU. names: the files' paths,
    for the error when one cannot be decoded at all.

    On CUDA the decoder gets a stream of its own. torchvision allocates the decoded images on
    the current stream but nvjpeg writes them from another one (and its hardware engine does not
    wait for queued work), so on the training stream it could be handed, and overwrite, a
    block that queued kernels still read (pytorch/vision PR 9606). Its own stream's blocks are
    only ever decoder outputs, marked as used by the caller's stream, so the allocator recycles
    them only once the caller's work on them is done."""
    device = torch.device(device)
    if device.type != 'cuda':
        return _decode(data, device, names)
    if device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    caller, own = torch.cuda.current_stream(device), _stream('decode', device)
    if own == caller:
        raise RuntimeError('decode_batch called on its own decode stream; decoded images could be overwritten')
    if torch.cuda.get_allocator_backend() != 'native':
        # cudaMallocAsync orders memory reuse on the GPU only, which nvjpeg does not honour: wait
        torch.cuda.synchronize(device)
    with torch.cuda.stream(own):
        out = _decode(data, device, names)
    own.synchronize()  # nvjpeg has already waited for itself; this covers the CPU-decoded copies
    for im in out:
        im.record_stream(caller)
    return out


def _decode(data: Sequence[torch.Tensor], device: torch.device, names: Sequence[str] | None) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [i for i, d in enumerate(data) if _is_jpeg(d)]
    if jpeg:
        for i, im in zip(jpeg, _decode_jpegs([data[i] for i in jpeg], device)):
            out[i] = im
    for i, d in enumerate(data):
        if out[i] is None:  # not a JPEG, or one the batched decoder refused even alone
            out[i] = decode_rgb(d, names[i] if names else f'file {i} of the batch').to(device)
    return out


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched decode_jpeg call; when it refuses the batch, each half is tried again, down to
    single files, so one odd file (ImageNet has a few CMYK JPEGs) costs about 2 log2(B) more
    batched calls instead of sending its whole batch to the CPU. None: a file refused alone."""
    global _refusals
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        if isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e).lower():
            raise  # torchvision re-raises its errors as plain RuntimeErrors
        if device.type == 'cuda':  # nvjpeg may have failed with work in flight into freed outputs
            torch.cuda.synchronize(device)
        if len(data) > 1:
            mid = len(data) // 2
            return _decode_jpegs(data[:mid], device) + _decode_jpegs(data[mid:], device)
        _refusals += 1
        if _refusals == 1:
            reason = (str(e).splitlines() or [''])[0][:200]
            print(f'note: the batched JPEG decoder refused a file ({reason}); such files are decoded on the '
                  f'CPU', flush=True)
        return [None]


def prepared_ahead(raw_batches: Iterable, prepare: Callable[[int, Any], tuple[torch.Tensor, ...]], ahead: int,
                   device: torch.device | str) -> Iterator[tuple[torch.Tensor, ...]]:
    """prepare(b, raw) for each raw batch b, in order, computed up to `ahead` batches in advance by
    one background thread (ahead = 0: on the calling thread).

    Why a thread: decode_jpeg on CUDA returns only when nvjpeg has finished (it synchronises its
    own stream, with the GIL released), so on the training thread it would stall the kernel
    launches of the step. On CUDA the thread queues its work on a side stream; before a batch is
    handed over, the consumer's current stream waits for that batch's event, and the batch's
    tensors are marked as used on that stream so the caching allocator does not give their
    memory to a later batch while the step still reads them."""
    if ahead <= 0:
        for b, raw in enumerate(raw_batches):
            yield prepare(b, raw)
        return
    device = torch.device(device)
    cuda = device.type == 'cuda'
    if cuda and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    side = _stream('prepare', device) if cuda else None

    def task(b: int, raw) -> tuple[tuple[torch.Tensor, ...], Any]:
        if not cuda:
            return prepare(b, raw), None
        with torch.cuda.device(device), torch.cuda.stream(side):
            out = prepare(b, raw)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def hand_over(result: tuple[tuple[torch.Tensor, ...], Any]) -> tuple[torch.Tensor, ...]:
        out, done = result
        if done is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            for t in out:
                t.record_stream(current)
        return out

    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='prepare-batches') as pool:
        try:
            for b, raw in enumerate(raw_batches):
                pending.append(pool.submit(task, b, raw))
                if len(pending) > ahead:
                    yield hand_over(pending.popleft().result())
            while pending:
                yield hand_over(pending.popleft().result())
        finally:  # the consumer stopped early or a batch failed: drop what was queued
            for future in pending:
                future.cancel()


class GpuJpegLoader:
    """--data_backend gpu: the engine's loader interface (len, iteration over (images, targets)
    on the device, .sampler.set_epoch, .dataset.root). Batches are decoded and augmented
    `decode_ahead` batches in advance by a background thread (prepared_ahead)."""

    def __init__(self, root: str | Path, input_size: int, batch_size: int, seed: int, num_workers: int,
                 world_size: int, rank: int, device: torch.device | str, mode: str = 'bicubic',
                 max_canvas_pixels: int = MAX_CANVAS_PIXELS, decode_ahead: int = 2, cpu_decode_share: float = 0.0,
                 pin_memory: bool = False):
        check_cpu_decode_share('gpu', cpu_decode_share)
        self.dataset = JpegBytesFolder(root)
        _check_enough(self.dataset, root, batch_size, world_size)
        self.input_size, self.batch_size, self.seed, self.rank = input_size, batch_size, seed, rank
        self.device, self.mode, self.max_canvas_pixels = torch.device(device), mode, max_canvas_pixels
        self.decode_ahead, self.cpu_decode_share = decode_ahead, cpu_decode_share
        self.sampler = EpochSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                    seed=seed, drop_last=True)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, sampler=self.sampler, batch_size=batch_size, num_workers=check_num_workers(num_workers),
            collate_fn=functools.partial(collate_bytes, cpu_decode_share=cpu_decode_share), drop_last=True,
            # with workers, the CPU-decoded pixels (about 0.6 MB an ImageNet image) are pinned by the
            # loader's own thread, not by the decode thread, which has nvjpeg to feed (without
            # pinning here, to_device pins them there); bytes alone need no pinning
            pin_memory=pin_memory and cpu_decode_share > 0, persistent_workers=num_workers > 0,
            # bytes are small: 4 batches ahead per worker; decoded pixels are 4x a pil batch: 2
            prefetch_factor=(2 if cpu_decode_share > 0 else 4) if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch

        def prepare(b: int, raw) -> tuple[torch.Tensor, torch.Tensor]:
            packed, lengths, pixels, shapes, targets, names = raw
            images = split_pixels(to_device(pixels, self.device), shapes) if len(shapes) else []
            if len(lengths):
                images += decode_batch(split_bytes(packed, lengths), self.device, names)
            gen = batch_generator(self.seed, epoch, b, self.rank)
            return (augment_images(images, gen, self.input_size, mode=self.mode,
                                   max_canvas_pixels=self.max_canvas_pixels),
                    to_device(targets, self.device))

        yield from prepared_ahead(self.loader, prepare, self.decode_ahead, self.device)


# ---- backend: gpu-cache (decoded once, kept on the device) -------------------------------------
def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, or an error that names the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f'cannot decode {path}: {e}') from None


def default_cache_size(paths: Sequence[str], input_size: int) -> int:
    """The images' own shorter side when they all have one size, else input_size * 1.15 rounded."""
    sizes = set()
    for p in paths:
        sizes.add(_image_size(p))
        if len(sizes) > 1:
            return int(round(input_size * 1.15))
    (w, h), = sizes
    return min(w, h)


def cache_resolution_note(paths: Sequence[str], cache_size: int, most: int = 500) -> str | None:
    """A note when most images are larger than the cache: a random crop then spans fewer source
    pixels than the pil backend's crop of the original image, so inputs and HOG targets are
    blurrier. Judged from the headers of up to `most` images, evenly spaced over the list."""
    shorter = sorted(min(_image_size(p)) for p in paths[::max(len(paths) // most, 1)][:most])
    median = shorter[len(shorter) // 2]
    if median <= cache_size:
        return None
    return (f'note: gpu-cache keeps the images at {cache_size} px, below their typical shorter side (median '
            f'{median} px over {len(shorter)} images): random crops see fewer pixels than with --data_backend pil '
            f'(blurrier inputs and HOG targets); --cache_size {median} keeps them '
            f'({len(paths) * 3 * median ** 2 / 2**30:.1f} GiB)')


class _SquareDecode(torch.utils.data.Dataset):
    """Image i -> uint8 (3, S, S): PIL decode, shorter side resized to S (bicubic), centre crop."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        im = TF.resize(load_rgb(self.paths[i]), self.size, interpolation=InterpolationMode.BICUBIC)
        im = TF.center_crop(im, [self.size, self.size])
        return TF.pil_to_tensor(im)


def decode_to_cache(paths: Sequence[str], size: int, num_workers: int = 0, log=print) -> torch.Tensor:
    """All images as one uint8 (N, 3, S, S) CPU tensor, with a progress line about every 10%."""
    n = len(paths)
    cache = torch.empty((n, 3, size, size), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(_SquareDecode(paths, size), batch_size=64,
                                         num_workers=check_num_workers(num_workers), shuffle=False)
    start, done, next_report = time.perf_counter(), 0, 0
    for batch in loader:
        cache[done:done + len(batch)] = batch
        done += len(batch)
        if done >= next_report or done == n:
            log(f'gpu-cache: decoded {done}/{n} images at {size}x{size} '
                f'({time.perf_counter() - start:.0f}s)', flush=True)
            next_report = done + max(n // 10, 1)
    return cache


class GpuCacheLoader:
    """--data_backend gpu-cache: every image decoded once into one uint8 (N, 3, S, S) tensor on
    the device; batches follow EpochSampler (DistributedSampler, seed, set_epoch, per-rank
    shards, drop_last) and are augmented on the device. `device` may be the CPU (tests)."""

    def __init__(self, root: str | Path, input_size: int, batch_size: int, seed: int, num_workers: int,
                 world_size: int, rank: int, device: torch.device | str, cache_size: int | None = None,
                 mode: str = 'bicubic', log=print):
        self.dataset = ClassFolder(root)
        _check_enough(self.dataset, root, batch_size, world_size)
        self.input_size, self.batch_size, self.seed, self.rank = input_size, batch_size, seed, rank
        self.device, self.mode = torch.device(device), mode
        paths = [p for p, _ in self.dataset.samples]
        self.cache_size = cache_size or default_cache_size(paths, input_size)
        nbytes = len(paths) * 3 * self.cache_size ** 2
        if self.device.type == 'cuda':
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > 0.8 * free:
                raise SystemExit(
                    f'error: --data_backend gpu-cache needs {nbytes / 2**30:.1f} GiB for {len(paths)} images at '
                    f'{self.cache_size}px, more than 80% of the {free / 2**30:.1f} GiB free on {self.device}; '
                    f'lower --cache_size or use --data_backend gpu')
        log(f'gpu-cache: {len(paths)} images at {self.cache_size}x{self.cache_size} = {nbytes / 2**30:.2f} GiB '
            f'on {self.device}', flush=True)
        note = cache_resolution_note(paths, self.cache_size)
        if note:
            log(note, flush=True)
        self.images = decode_to_cache(paths, self.cache_size, num_workers, log).to(self.device)
        self.targets = torch.tensor(self.dataset.targets, dtype=torch.int64, device=self.device)
        self.sampler = EpochSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                    seed=seed, drop_last=True)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def batch_indices(self) -> torch.Tensor:
        """(len(self), batch_size) dataset indices of this rank's batches in the current epoch."""
        indices = [i for _, i in self.sampler]
        n = len(self) * self.batch_size
        return torch.tensor(indices[:n], dtype=torch.int64).view(len(self), self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch
        batches = self.batch_indices().to(self.device)
        for b in range(batches.shape[0]):
            idx = batches[b]
            gen = batch_generator(self.seed, epoch, b, self.rank)
            yield (augment_images(self.images.index_select(0, idx), gen, self.input_size, mode=self.mode),
                   self.targets.index_select(0, idx))


# ---- choice ----------------------------------------------------------------------------------
INPUT_BOUND_SHARE = 0.2  # an epoch that waited this share of its time for batches is input-bound


def input_bound_hint(backend: str, wait_s: float, epoch_s: float, cpu_decode_share: float = 0.0,
                     device_type: str = 'cuda') -> str | None:
    """Advice after a GPU epoch whose step waited for the input pipeline for a large share of
    its time (FreezeOut's savings then do not reach the wall clock); None when it did not, and
    on the CPU (where the workers and the step share the cores, and no GPU backend exists)."""
    if device_type != 'cuda' or backend not in ('pil', 'gpu') or epoch_s <= 0 or wait_s / epoch_s < INPUT_BOUND_SHARE:
        return None
    if backend == 'pil':
        advice = '--data_backend gpu (JPEGs decoded by nvjpeg), gpu-cache when the images fit in GPU memory, ' \
                 'or more --num_workers'
    else:
        advice = ('a larger --cpu_decode_share (the workers then decode part of each batch)' if cpu_decode_share < 0.5
                  else 'more --num_workers') + ', or gpu-cache when the images fit in GPU memory'
    return (f'note: the step waited for its input {wait_s / epoch_s:.0%} of this epoch ({wait_s:.1f} of '
            f'{epoch_s:.1f} s): the input pipeline, not the model, set the speed; try {advice} '
            f'(benchmark.py --data_path times the backends)')


def check_cpu_decode_share(backend: str, share: float) -> None:
    """--cpu_decode_share: a fraction, and only for the gpu backend (a clear SystemExit)."""
    if not 0.0 <= share <= 1.0:
        raise SystemExit(f'error: --cpu_decode_share must lie in [0, 1], got {share}')
    if share and backend != 'gpu':
        raise SystemExit(f'error: --cpu_decode_share applies to --data_backend gpu only (got {backend})')


def require_cuda(backend: str, device: torch.device | str | None) -> torch.device:
    """The GPU backends' device check, a clear SystemExit instead of a traceback."""
    dev = torch.device(device if device is not None else 'cpu')
    if dev.type != 'cuda' or not torch.cuda.is_available():
        seen = '' if torch.cuda.is_available() else '; no CUDA GPU is visible'
        raise SystemExit(f'error: --data_backend {backend} needs a CUDA device (got --device {dev}{seen}); '
                         f'use --data_backend pil')
    return dev


def build_loader(backend: str, data_path: str, input_size: int, batch_size: int, seed: int, num_workers: int,
                 pin_mem: bool, world_size: int, rank: int, device: torch.device | str | None = None,
                 cache_size: int | None = None, decode_ahead: int = 2, cpu_decode_share: float = 0.0,
                 resample: str = 'bicubic'):
    """The pretraining loader of --data_backend: 'pil' (util.data.build_pretrain_loader: CPU
    workers), 'gpu' or 'gpu-cache'. All three yield normalised float32 batches on `device`.
    decode_ahead: batches the gpu backend prepares in advance on its background thread;
    cpu_decode_share: the share of each of its batches that its workers decode on the CPU;
    resample: the GPU backends' resized crop, 'bicubic' (grid_sample) or 'pil' (resized_crop_batch)."""
    if resample not in GPU_RESAMPLE_CHOICES:
        raise SystemExit(f'error: unknown --gpu_resample {resample}; choose one of: {", ".join(GPU_RESAMPLE_CHOICES)}')
    check_cpu_decode_share(backend, cpu_decode_share)
    if backend == 'pil':
        return build_pretrain_loader(data_path, input_size, batch_size, seed, num_workers, pin_mem,
                                     world_size, rank, device if device is not None else 'cpu')
    if backend not in BACKENDS:
        raise SystemExit(f'error: unknown --data_backend {backend}; choose one of: {", ".join(BACKENDS)}')
    dev = require_cuda(backend, device)
    root = resolve_image_folder(data_path, 'train')
    if backend == 'gpu':
        return GpuJpegLoader(root, input_size, batch_size, seed, num_workers, world_size, rank, dev, mode=resample,
                             decode_ahead=decode_ahead, cpu_decode_share=cpu_decode_share, pin_memory=pin_mem)
    return GpuCacheLoader(root, input_size, batch_size, seed, num_workers, world_size, rank, dev, cache_size,
                          mode=resample)
