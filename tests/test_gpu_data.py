"""util.gpu_data: the batched crop/flip/normalise core (on CPU tensors), the crop-box sampler
against torchvision's RandomResizedCrop, the gpu and gpu-cache loaders run with device='cpu',
and the CLI refusing a GPU backend without CUDA."""
import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from helpers import run_pretrain
from util.data import (CROP_RATIO, CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, EpochSampler, normalize_uint8_range,
                       sample_crop_boxes, sample_flips)
from util.gpu_data import (GpuCacheLoader, GpuJpegLoader, augment_images, batch_generator, batch_seed,
                           build_loader, crop_grids, default_cache_size, make_canvas, plan_canvas_groups,
                           prepared_ahead, resized_crop_batch, resized_crop_list)

LO = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
HI = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def smooth_image(h, w, seed=0, batch=1):
    """Random but smooth 0..255 float images (B, 3, h, w)."""
    g = gen(seed)
    coarse = torch.rand(batch, 3, max(h // 4, 2), max(w // 4, 2), generator=g) * 255
    return F.interpolate(coarse, size=(h, w), mode='bilinear', align_corners=False)


def test_batch_seeds_differ_by_seed_epoch_batch_and_rank():
    keys = [(s, e, b, r) for s in (0, 1) for e in (0, 1, 399) for b in (0, 1, 5004) for r in (0, 1, 7)]
    seeds = {batch_seed(*k) for k in keys}
    assert len(seeds) == len(keys)
    assert all(0 <= x < 2 ** 63 for x in seeds)
    a = torch.rand(4, generator=batch_generator(0, 3, 2, 1))
    assert torch.equal(a, torch.rand(4, generator=batch_generator(0, 3, 2, 1)))


# ---- crop box sampler ---------------------------------------------------------------------------
def test_crop_boxes_inside_image_and_seeded():
    g = gen(1)
    heights = torch.randint(1, 600, (3000,), generator=g)
    widths = torch.randint(1, 600, (3000,), generator=g)
    boxes = sample_crop_boxes(heights, widths, gen(5))
    assert boxes.shape == (3000, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    assert torch.equal(boxes, sample_crop_boxes(heights, widths, gen(5)))
    assert not torch.equal(boxes, sample_crop_boxes(heights, widths, gen(6)))


def torchvision_boxes(height, width, n, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        img = torch.empty(1, height, width)
        return torch.tensor([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


def ks_statistic(a, b):
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    points = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, points, side='right') / len(a)
                  - np.searchsorted(b, points, side='right') / len(b)).max()


def box_stats(boxes, height, width):
    top, left, h, w = [x.double().numpy() for x in boxes.unbind(1)]
    return {'area': h * w / (height * width), 'log_aspect': np.log(w / h),
            'centre_x': (left + w / 2) / width, 'centre_y': (top + h / 2) / height}


@pytest.mark.parametrize('height,width', [(375, 500), (500, 333), (80, 300), (300, 80)])
def test_crop_box_distribution_matches_torchvision(height, width):
    n_ours, n_tv = 20000, 6000
    ours = sample_crop_boxes([height] * n_ours, [width] * n_ours, gen(0))
    tv = torchvision_boxes(height, width, n_tv)
    a, b = box_stats(ours, height, width), box_stats(tv, height, width)
    # two-sample KS at a false-alarm rate of about 1e-4 (rounded values make it conservative)
    threshold = 2.23 * math.sqrt((n_ours + n_tv) / (n_ours * n_tv))
    for key in a:
        assert ks_statistic(a[key], b[key]) < threshold, key
        se = math.sqrt(a[key].var() / n_ours + b[key].var() / n_tv)
        assert abs(a[key].mean() - b[key].mean()) < 5 * se + 1e-9, key
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(a[key], q) - np.quantile(b[key], q)) < 0.05, (key, q)
    # centre-crop fallback (no try fits) at the same rate
    in_ratio = width / height
    fw = width if in_ratio <= 4 / 3 else round(height * 4 / 3)
    fh = height if in_ratio >= 3 / 4 else round(width / (3 / 4))
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    rate_ours = (ours == fallback).all(1).double().mean().item()
    rate_tv = (tv == fallback).all(1).double().mean().item()
    assert abs(rate_ours - rate_tv) < 5 * math.sqrt(0.25 / n_tv) + 1e-9
    if in_ratio > 3 or in_ratio < 1 / 3:
        assert rate_ours > 0.2  # these shapes do exercise the fallback


def test_crop_box_fallback_is_torchvision_centre_crop():
    for height, width in [(10, 400), (400, 10)]:  # no try can fit: always the fallback
        ours = sample_crop_boxes([height] * 50, [width] * 50, gen(0))
        tv = torchvision_boxes(height, width, 50)
        assert (ours == tv[0]).all() and (tv == tv[0]).all()


def test_flip_rate_and_seeding():
    flips = sample_flips(20000, gen(0))
    assert flips.dtype == torch.bool
    assert abs(flips.double().mean().item() - 0.5) < 0.02
    assert torch.equal(flips, sample_flips(20000, gen(0)))


# ---- resampling core --------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('out_size', [24, 64, 100])
def test_whole_image_box_is_plain_resize(mode, out_size):
    img = smooth_image(48, 72, seed=3) + torch.rand(1, 3, 48, 72, generator=gen(4)) * 20
    box = torch.tensor([[0, 0, 48, 72]])
    out = resized_crop_batch(img, box, torch.tensor([False]), out_size, mode)
    ref = F.interpolate(img, size=(out_size, out_size), mode=mode, align_corners=False)
    assert out.shape == (1, 3, out_size, out_size) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.05), (out - ref).abs().max()


def test_sub_crop_offsets_and_flip():
    """A box inside the image, halved with bilinear: every tap lies inside the box, so the result
    equals interpolating the sliced crop exactly; a flip mirrors it."""
    img = torch.rand(2, 3, 50, 70, generator=gen(7)) * 255
    boxes = torch.tensor([[5, 9, 32, 32], [17, 30, 32, 32]])  # (top, left, h, w)
    no_flip = torch.tensor([False, False])
    out = resized_crop_batch(img, boxes, no_flip, 16, 'bilinear')
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(img[i:i + 1, :, t:t + h, l:l + w], size=(16, 16), mode='bilinear',
                            align_corners=False, antialias=False)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-3), (i, (out[i] - ref[0]).abs().max())
    flipped = resized_crop_batch(img, boxes, torch.tensor([True, False]), 16, 'bilinear')
    assert torch.allclose(flipped[0], out[0].flip(-1), atol=1e-3)
    assert torch.allclose(flipped[1], out[1], atol=1e-6)


def test_grid_maps_box_edges():
    grid = crop_grids(torch.tensor([[10, 20, 40, 60]]), torch.tensor([False]), 100, 200, 4)
    # pixel-edge coordinate of output centre j is left + (j + .5) * w / S -> normalised 2 x / W - 1
    xs = [(2 * (20 + (j + .5) * 60 / 4)) / 200 - 1 for j in range(4)]
    ys = [(2 * (10 + (j + .5) * 40 / 4)) / 100 - 1 for j in range(4)]
    assert torch.allclose(grid[0, 0, :, 0], torch.tensor(xs), atol=1e-6)
    assert torch.allclose(grid[0, :, 0, 1], torch.tensor(ys), atol=1e-6)


def test_canvas_replicates_edges():
    a = torch.arange(2 * 3, dtype=torch.uint8).view(1, 2, 3).expand(3, 2, 3)
    b = torch.zeros(3, 4, 2, dtype=torch.uint8)
    canvas = make_canvas([a, b])
    assert canvas.shape == (2, 3, 4, 3)
    assert torch.equal(canvas[0, :, :2], a)
    assert torch.equal(canvas[0, :, 2:], a[:, 1:2].expand(3, 2, 3))  # rows repeated
    assert torch.equal(canvas[1, :, :, 2], b[:, :, 1])  # last column repeated


def test_canvas_equals_replicate_padding_of_each_image():
    """The one-gather canvas is each image padded on its right and bottom by repeating its edge
    (F.pad 'replicate', image by image), for random sizes, one image, and non-contiguous views."""
    g = gen(3)
    for n in (1, 2, 7):
        sizes = [(int(h), int(w)) for h, w in torch.randint(1, 30, (n, 2), generator=g)]
        images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
        images[0] = images[0].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
        canvas = make_canvas(images)
        hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
        assert canvas.shape == (n, 3, hmax, wmax) and canvas.dtype == torch.uint8 and canvas.is_contiguous()
        for im, (h, w), got in zip(images, sizes, canvas):
            expect = F.pad(im[None].float(), (0, wmax - w, 0, hmax - h), mode='replicate')[0]
            assert torch.equal(got.float(), expect)


def test_plan_canvas_groups_partition_and_budget():
    g = gen(2)
    sizes = [(int(h), int(w)) for h, w in torch.randint(20, 300, (50, 2), generator=g)]
    budget = 4 * 200 * 200
    groups = plan_canvas_groups(sizes, budget)
    assert sorted(i for grp in groups for i in grp) == list(range(50))
    assert len(groups) > 1
    for grp in groups:
        if len(grp) > 1:
            assert len(grp) * max(sizes[i][0] for i in grp) * max(sizes[i][1] for i in grp) <= budget


def test_list_of_sizes_matches_each_image_alone():
    """Images of different sizes, padded into canvases and resampled in groups, give what each
    image gives alone, also for boxes touching the right/bottom edge (bicubic taps past it)."""
    shapes = [(30, 40), (64, 48), (50, 50), (33, 70)]
    images = [(smooth_image(h, w, seed=i)[0]).round().to(torch.uint8) for i, (h, w) in enumerate(shapes)]
    boxes = torch.tensor([[0, 0, 30, 40], [64 - 20, 48 - 30, 20, 30], [10, 5, 40, 45], [3, 70 - 33, 30, 33]])
    flips = torch.tensor([False, True, False, True])
    out = resized_crop_list(images, boxes, flips, 24, 'bicubic', max_canvas_pixels=2 * 64 * 70)
    for i, im in enumerate(images):
        alone = resized_crop_batch(im[None], boxes[i:i + 1], flips[i:i + 1], 24, 'bicubic')
        assert torch.allclose(out[i], alone[0], atol=0.05), (i, (out[i] - alone[0]).abs().max())


def test_augment_shapes_ranges_and_normalisation():
    images = (torch.rand(6, 3, 40, 52, generator=gen(0)) * 255).to(torch.uint8)
    out = augment_images(images, gen(1), 32)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert (out >= LO - 1e-5).all() and (out <= HI + 1e-5).all()
    assert torch.equal(out, augment_images(images, gen(1), 32))
    assert not torch.equal(out, augment_images(images, gen(2), 32))
    grey = torch.full((2, 3, 40, 52), 128, dtype=torch.uint8)
    expect = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    assert torch.allclose(augment_images(grey, gen(0), 16), expect.expand(2, 3, 16, 16), atol=1e-4)
    # overshoot is clipped as PIL does
    assert torch.allclose(normalize_uint8_range(torch.full((1, 3, 1, 1), 300.)), HI, atol=1e-5)
    # a list of same-size images draws the same boxes and flips as the stacked tensor
    as_list = augment_images(list(images), gen(1), 32)
    assert torch.allclose(as_list, out, atol=1e-3)


def test_augment_matches_pil_pipeline_roughly():
    """Same box and flip through PIL's resized_crop (upstream) and the batched resample: close
    (they differ in antialiasing, edge handling and the cubic kernel: A = -0.75 vs PIL's -0.5)."""
    arr = smooth_image(60, 80, seed=9)[0].round().clamp(0, 255).to(torch.uint8)
    pil = TF.to_pil_image(arr)
    box = torch.tensor([[6, 10, 48, 56]])
    ref = TF.to_tensor(TF.hflip(TF.resized_crop(pil, 6, 10, 48, 56, [40, 40],
                                                interpolation=InterpolationMode.BICUBIC)))
    ours = resized_crop_batch(arr[None], box, torch.tensor([True]), 40, 'bicubic')[0].clamp(0, 255) / 255
    assert (ours - ref).abs().mean() < 0.01
    assert (ours - ref).abs().max() < 0.1


def pil_crops(images, boxes, flips, size: int) -> torch.Tensor:
    """The pil backend's resized crop (PIL crop, bicubic resize, flip) of each image: uint8 (B, 3, S, S)."""
    out = []
    for im, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = TF.resized_crop(TF.to_pil_image(im), top, left, h, w, [size, size], InterpolationMode.BICUBIC)
        out.append(TF.pil_to_tensor(TF.hflip(crop) if flip else crop))
    return torch.stack(out)


def test_pil_resample_gives_the_pil_backends_pixels():
    """--gpu_resample pil: crops shrunk (antialiased) and enlarged, taller and wider than square,
    flipped or not, from images of several sizes padded into shared canvases: within one grey
    level of PIL's resized crop (8-bit rounding); grid_sample's bicubic is not."""
    g = torch.Generator().manual_seed(0)
    sizes = [(90, 70), (64, 96), (120, 120), (50, 80), (100, 60), (70, 110)]
    # noise, the worst case for a resampler, plus a smooth part so both regimes are covered
    images = [(torch.rand(3, h, w, generator=g) * 127.5 + smooth_image(h, w, seed=h)[0] * 0.5).round().to(torch.uint8)
              for h, w in sizes]
    size = 40
    boxes = torch.tensor([[3, 5, 80, 50], [0, 10, 30, 70], [7, 2, 100, 113], [10, 20, 20, 24], [0, 0, 100, 60],
                          [20, 30, 36, 36]])  # (top, left, h, w): shrink / enlarge, tall / wide
    flips = torch.tensor([False, True, False, True, True, False])
    expected = pil_crops(images, boxes, flips, size).float()
    ours = resized_crop_list(images, boxes, flips, size, 'pil', max_canvas_pixels=2 * 120 * 120)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1
    assert (ours - expected).abs().mean() < 0.05
    grid = resized_crop_list(images, boxes, flips, size, 'bicubic').clamp(0, 255).round()
    assert (grid - expected).abs().mean() > 1  # the shrunk noise crops alias
    one = resized_crop_batch(images[2][None], boxes[2:3], flips[2:3], size, 'pil')  # one image, no canvas
    assert torch.equal(one, ours[2:3])


def test_pil_resample_follows_pillows_pass_order_on_random_crops():
    """PIL rounds between its two passes, so their order shows on noise (several grey levels).
    RandomResizedCrop boxes of every shape (as the pretraining draws them) and odd sizes, 1 px
    crops included, on noise images: all within one grey level of PIL."""
    from util.gpu_data import pil_height_first
    g = torch.Generator().manual_seed(1)
    sizes = [(56, 44), (90, 60), (60, 90), (75, 75), (120, 70)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes * 8]
    for size in (32, 48):
        boxes = sample_crop_boxes([im.shape[1] for im in images], [im.shape[2] for im in images], g,
                                  CROP_SCALE, CROP_RATIO)
        boxes[:5] = torch.tensor([[0, 0, 56, 44], [0, 0, 90, 60], [0, 0, 60, 90], [74, 74, 1, 1], [0, 0, 120, 1]])
        flips = sample_flips(len(images), g)
        expected = pil_crops(images, boxes, flips, size).float()
        ours = resized_crop_list(images, boxes, flips, size, 'pil')
        worst = (ours - expected).abs().amax(dim=(1, 2, 3))
        assert worst.max() <= 1, [(boxes[i].tolist(), worst[i].item()) for i in range(len(images)) if worst[i] > 1]
        if size == 32:
            assert pil_height_first(boxes, size)[:3].tolist() == [False, True, False]  # 56 - 32 <= 2 (44 - 32)


def test_pil_resample_in_the_gpu_cache_pipeline(tmp_path):
    """augment_images on a cached (B, 3, S, S) batch with mode 'pil' equals PIL's crops of the same
    drawn boxes and flips; the loader takes the mode from build_loader's `resample`."""
    from util.gpu_data import build_loader
    cached = smooth_image(48, 48, seed=3, batch=4).round().to(torch.uint8)
    out = augment_images(cached, gen(7), 32, mode='pil')
    replay = gen(7)
    boxes = sample_crop_boxes([48] * 4, [48] * 4, replay, CROP_SCALE, CROP_RATIO)
    flips = sample_flips(4, replay)
    assert (out - normalize_uint8_range(pil_crops(cached, boxes, flips, 32).float())).abs().max() < 1.01 / 255 / 0.2
    with pytest.raises(SystemExit, match='unknown --gpu_resample'):
        build_loader('gpu-cache', str(tmp_path), 32, 2, 0, 0, False, 1, 0, 'cpu', resample='lanczos')


# ---- loaders on CPU -----------------------------------------------------------------------------
def write_folder(base: Path, sizes, classes=('a', 'b'), seed=0, png_every=0):
    rng = np.random.default_rng(seed)
    k = 0
    for c in classes:
        (base / c).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            if png_every and k % png_every == png_every - 1:
                Image.fromarray(arr).save(base / c / f'{i}.png')
            else:
                Image.fromarray(arr).save(base / c / f'{i}.jpg', quality=90)
            k += 1
    return base


def assert_same_batches(loader_a, loader_b, batches: int) -> None:
    """Both loaders give the same `batches` batches, bit for bit, in epochs 0 and 1."""
    for epoch in (0, 1):
        loader_a.sampler.set_epoch(epoch)
        loader_b.sampler.set_epoch(epoch)
        a, b = list(loader_a), list(loader_b)
        assert len(a) == len(b) == batches
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_bytes_travel_packed_one_tensor_per_batch(tmp_path):
    """Workers send a batch's files as one packed tensor (one shared-memory handle, not one per file);
    the views split from it decode exactly like the files."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from util.gpu_data import JpegBytesFolder, collate_bytes, split_bytes
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50)], png_every=2)
    loader = torch.utils.data.DataLoader(JpegBytesFolder(root), batch_size=5, num_workers=2, collate_fn=collate_bytes)
    packed, lengths, pixels, shapes, targets, names = next(iter(loader))
    assert names == [path for path, _ in loader.dataset.samples[:5]]
    assert pixels.numel() == 0 and shapes.shape == (0, 2)  # no CPU decode share: all files stay bytes
    assert packed.dtype == torch.uint8 and packed.ndim == 1 and lengths.tolist() == [
        len(read_file(path)) for path, _ in loader.dataset.samples[:5]]
    assert targets.tolist() == [t for _, t in loader.dataset.samples[:5]]
    for view, (path, _) in zip(split_bytes(packed, lengths), loader.dataset.samples):
        assert torch.equal(view, read_file(path))
        assert torch.equal(decode_image(view, mode=ImageReadMode.RGB), decode_image(read_file(path), mode=ImageReadMode.RGB))


@pytest.mark.parametrize('share, decoded', [(0.4, 2), (1.0, 5), (0.05, 0)])
def test_cpu_decode_share_is_decoded_by_the_workers(tmp_path, share, decoded):
    """With --cpu_decode_share the first round(share * B) files of a batch arrive decoded (packed
    pixels + shapes), the rest as packed bytes; targets keep the batch order."""
    import functools

    from util.gpu_data import JpegBytesFolder, collate_bytes, split_bytes, split_pixels
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50)], png_every=2)
    collate = functools.partial(collate_bytes, cpu_decode_share=share)
    loader = torch.utils.data.DataLoader(JpegBytesFolder(root), batch_size=5, num_workers=2, collate_fn=collate)
    packed, lengths, pixels, shapes, targets, names = next(iter(loader))
    samples = loader.dataset.samples[:5]
    assert targets.tolist() == [t for _, t in samples] and names == [p for p, _ in samples[decoded:]]
    assert shapes.shape == (decoded, 2) and lengths.shape == (5 - decoded,)
    assert pixels.dtype == torch.uint8 and pixels.numel() == 3 * int(shapes.prod(1).sum())
    for im, (path, _) in zip(split_pixels(pixels, shapes), samples[:decoded]):
        assert torch.equal(im, decode_image(read_file(path), mode=ImageReadMode.RGB))
    views = split_bytes(packed, lengths)
    assert len(views) == 5 - decoded
    for view, (path, _) in zip(views, samples[decoded:]):
        assert torch.equal(view, read_file(path))


@pytest.mark.parametrize('share, workers', [(0.5, 0), (1.0, 2)])
def test_gpu_loader_cpu_decode_share_gives_the_same_batches(tmp_path, share, workers):
    """Where a file is decoded changes nothing else: on the CPU both decoders are libjpeg, so the
    batches are identical (on a GPU nvjpeg differs by a grey level or so: test_gpu_paths)."""
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50), (20, 36)], png_every=3)
    kw = dict(input_size=16, batch_size=3, seed=5, world_size=1, rank=0, device='cpu', num_workers=workers)
    assert_same_batches(GpuJpegLoader(root, **kw), GpuJpegLoader(root, cpu_decode_share=share, **kw), 2)


def test_build_loader_passes_the_cpu_decode_share_on(tmp_path, monkeypatch):
    """run_pretrain's flag reaches the workers: a raw batch of build_loader('gpu', ...) arrives
    with its share decoded (CUDA check bypassed to build it on CPU)."""
    import util.gpu_data as gd
    monkeypatch.setattr(gd, 'require_cuda', lambda backend, device: torch.device('cpu'))
    root = write_folder(tmp_path / 'data' / 'train', [(40, 30), (30, 44)])
    loader = build_loader('gpu', str(tmp_path / 'data'), 16, 4, 0, 0, False, 1, 0, device='cpu', cpu_decode_share=0.5)
    _, lengths, _, shapes, _, _ = next(iter(loader.loader))
    assert shapes.shape == (2, 2) and lengths.shape == (2,)
    assert next(iter(loader))[0].shape == (4, 3, 16, 16) and len(loader.dataset) == len(list(root.rglob('*.jpg')))


def test_run_pretrain_passes_the_cpu_decode_share_and_resample_to_the_loader(tmp_path, monkeypatch):
    import run_pretrain
    seen = []

    class Built(Exception):
        pass

    def fake_build_loader(*args):
        seen.append(args)
        raise Built
    monkeypatch.setattr(run_pretrain, 'build_loader', fake_build_loader)
    write_folder(tmp_path / 'data' / 'train', [(40, 30)] * 2)
    args = run_pretrain.get_args_parser().parse_args(
        ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--device', 'cpu', '--data_backend', 'gpu',
         '--cpu_decode_share', '0.25', '--gpu_resample', 'pil', '--data_path', str(tmp_path / 'data'),
         '--output_dir', str(tmp_path / 'out')])
    with pytest.raises(Built):
        run_pretrain.main(args)
    assert seen[0][0] == 'gpu' and seen[0][-2:] == (0.25, 'pil')


def test_decoding_names_the_file_it_cannot_decode_and_reads_what_pil_reads(tmp_path):
    """A corrupt file fails with its path, in the workers' CPU share and in the main process'
    decode alike. Formats torchvision's decoder cannot read (BMP, TIFF) and 16-bit PNGs (which it
    reads as uint16) give the pil backend's pixels: PIL's RGB conversion, which clips 16 bits."""
    import util.gpu_data as gd
    from util.data import load_rgb
    root = write_folder(tmp_path / 'train', [(40, 30)] * 3, classes=('a',))
    deep = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 31)
    Image.fromarray(deep).save(root / 'a' / 'deep.png')
    Image.open(root / 'a' / '1.jpg').save(root / 'a' / 'photo.bmp')
    Image.open(root / 'a' / '2.jpg').save(root / 'a' / 'photo.tif')
    bad = root / 'a' / 'bad.jpg'
    bad.write_bytes((root / 'a' / '0.jpg').read_bytes()[:200])  # a JPEG cut short
    folder = gd.JpegBytesFolder(root)
    items = {Path(p).name: folder[i] for i, (p, _) in enumerate(folder.samples)}
    odd = ['deep.png', 'photo.bmp', 'photo.tif']
    as_pil = [TF.pil_to_tensor(load_rgb(str(root / 'a' / name))) for name in odd]
    for share in (1.0, 0.0):  # decoded by the worker's collate, or by decode_batch
        packed, lengths, pixels, shapes, _, names = gd.collate_bytes([items[n] for n in odd] + [items['0.jpg']], share)
        images = (gd.split_pixels(pixels, shapes) + gd.decode_batch(gd.split_bytes(packed, lengths), 'cpu', names))
        for name, image, expected in zip(odd, images, as_pil):
            assert image.dtype == torch.uint8 and torch.equal(image, expected), name
        assert images[0].shape == (3, 40, 48) and images[0].float().mean() > 250  # clipped, as PIL does
        with pytest.raises(RuntimeError, match=f'cannot decode {bad}'):
            packed, lengths, _, _, _, names = gd.collate_bytes([items['0.jpg'], items['bad.jpg']], share)
            gd.decode_batch(gd.split_bytes(packed, lengths), 'cpu', names)


def test_the_gpu_backends_file_reader_names_an_empty_file_or_a_dangling_link(tmp_path):
    """The gpu backend's workers read the files' bytes (torchvision's read_file); a file that cannot
    be read is the same one-line UnreadableImage as in the pil backend, not read_file's error."""
    import util.gpu_data as gd
    from util.data import UnreadableImage
    root = write_folder(tmp_path / 'train', [(40, 30)] * 2, classes=('a',))
    (root / 'a' / 'empty.jpg').write_bytes(b'')
    (root / 'a' / 'gone.jpg').symlink_to(tmp_path / 'nowhere.jpg')
    folder = gd.JpegBytesFolder(root)
    names = [Path(p).name for p, _ in folder.samples]
    assert folder[names.index('0.jpg')][0].numel() > 0
    with pytest.raises(UnreadableImage, match=f'^cannot decode {root / "a" / "empty.jpg"}: Expected a non empty file$'):
        folder[names.index('empty.jpg')]
    with pytest.raises(UnreadableImage, match=f'^cannot decode {root / "a" / "gone.jpg"}: .*No such file'):
        folder[names.index('gone.jpg')]


@pytest.mark.parametrize('backend, share, message', [('gpu', 1.5, 'must lie in'), ('gpu', -0.1, 'must lie in'),
                                                     ('pil', 0.5, 'gpu only'), ('gpu-cache', 0.5, 'gpu only')])
def test_cpu_decode_share_is_checked(tmp_path, backend, share, message):
    from util.gpu_data import check_cpu_decode_share
    with pytest.raises(SystemExit, match=message):
        check_cpu_decode_share(backend, share)
    with pytest.raises(SystemExit, match=message):  # before any CUDA check or folder scan
        build_loader(backend, str(tmp_path / 'missing'), 32, 2, 0, 0, False, 1, 0, device='cpu',
                     cpu_decode_share=share)
    check_cpu_decode_share('gpu', 0.0)
    check_cpu_decode_share('pil', 0.0)


def test_gpu_loader_on_cpu(tmp_path):
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50), (36, 28), (60, 40)], png_every=4)
    loader = GpuJpegLoader(root, 32, batch_size=3, seed=4, num_workers=0, world_size=1, rank=0, device='cpu')
    assert len(loader.dataset) == 10 and loader.dataset.root == str(root)
    assert len(loader) == 3
    loader.sampler.set_epoch(2)
    batches = list(loader)
    assert len(batches) == 3
    for images, targets in batches:
        assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
        assert targets.shape == (3,) and targets.dtype == torch.int64
        assert (images >= LO - 1e-5).all() and (images <= HI + 1e-5).all()
    # batch b of epoch e: the sampler's indices, decoded, augmented with (seed, e, b, rank)'s generator
    indices = [i for _, i in loader.sampler]
    for b in range(3):
        idx = indices[3 * b:3 * b + 3]
        decoded = [decode_image(read_file(loader.dataset.samples[i][0]), mode=ImageReadMode.RGB) for i in idx]
        expect = augment_images(decoded, batch_generator(4, 2, b, 0), 32)
        assert torch.allclose(batches[b][0], expect, atol=1e-4)
        assert batches[b][1].tolist() == [loader.dataset.samples[i][1] for i in idx]
    # the same epoch again is identical (resume); another epoch differs
    again = list(loader)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, again))
    loader.sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], batches[0][0])


def test_decode_batch_falls_back_one_by_one(tmp_path, monkeypatch, capsys):
    """JPEGs the batched decoder refuses (nvjpeg: e.g. CMYK) and non-JPEG files are decoded alone."""
    import util.gpu_data as gd
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (20, 20)], classes=('a',), png_every=3)
    files = sorted(root.rglob('*.*'))
    data = [read_file(str(f)) for f in files]
    assert sum(gd._is_jpeg(d) for d in data) == 2
    expect = [decode_image(d, mode=ImageReadMode.RGB) for d in data]
    got = gd.decode_batch(data, 'cpu')
    assert all(torch.equal(a, b) for a, b in zip(got, expect))

    def refuse(*args, **kwargs):
        raise RuntimeError('nvjpeg: unsupported')
    monkeypatch.setattr(gd, 'decode_jpeg', refuse)
    monkeypatch.setattr(gd, '_refusals', 0)
    got = gd.decode_batch(data, 'cpu')
    assert all(torch.equal(a, b) for a, b in zip(got, expect))
    gd.decode_batch(data, 'cpu')
    notes = capsys.readouterr().out
    assert notes.count('refused a file (nvjpeg: unsupported)') == 1 and gd._refusals == 4  # said once

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory')
    monkeypatch.setattr(gd, 'decode_jpeg', out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not hidden by a silent fallback to the CPU
        gd.decode_batch(data, 'cpu')

    def wrapped_out_of_memory(*args, **kwargs):  # torchvision re-raises errors as plain RuntimeErrors
        raise RuntimeError('Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2 MiB')
    monkeypatch.setattr(gd, 'decode_jpeg', wrapped_out_of_memory)
    with pytest.raises(RuntimeError, match='out of memory'):
        gd.decode_batch(data, 'cpu')


def test_one_refused_jpeg_does_not_send_its_batch_to_the_cpu(tmp_path, monkeypatch):
    """A batch with one file the batched decoder refuses (e.g. a CMYK JPEG) is split until that
    file is alone: the others are still decoded in batched calls, only it on the CPU."""
    import util.gpu_data as gd
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (20, 20), (24, 36)] * 2, classes=('a',))
    data = [read_file(str(f)) for f in sorted(root.rglob('*.jpg'))]
    assert len(data) == 8
    expect = [decode_image(d, mode=ImageReadMode.RGB) for d in data]
    odd = data[5]
    real_decode_jpeg, batched_calls, cpu_decoded = gd.decode_jpeg, [], []

    def refuses_the_odd_one(batch, **kwargs):
        if any(d is odd for d in batch):
            raise RuntimeError('nvjpeg: CMYK not supported')
        batched_calls.append(len(batch))
        return real_decode_jpeg(batch, **kwargs)

    def counting_decode_image(d, **kwargs):
        cpu_decoded.append(d)
        return decode_image(d, **kwargs)
    monkeypatch.setattr(gd, 'decode_jpeg', refuses_the_odd_one)
    monkeypatch.setattr(gd, 'decode_image', counting_decode_image)
    monkeypatch.setattr(gd, '_refusals', 0)
    got = gd.decode_batch(data, 'cpu')
    assert all(torch.equal(a, b) for a, b in zip(got, expect))
    assert len(cpu_decoded) == 1 and cpu_decoded[0] is odd and gd._refusals == 1
    assert sorted(batched_calls) == [1, 2, 4]  # halves 0-3, then 4-5 -> 4 | 5 (refused), then 6-7


def test_gpu_loader_workers_same_as_main_process(tmp_path):
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50)])
    kw = dict(input_size=16, batch_size=2, seed=0, world_size=1, rank=0, device='cpu')
    a = list(GpuJpegLoader(root, num_workers=0, **kw))
    b = list(GpuJpegLoader(root, num_workers=2, **kw))
    assert len(a) == len(b) == 3
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_gpu_loader_decoding_ahead_gives_the_same_batches(tmp_path):
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50), (20, 36)])
    kw = dict(input_size=16, batch_size=2, seed=3, world_size=1, rank=0, device='cpu', num_workers=0)
    assert_same_batches(GpuJpegLoader(root, decode_ahead=0, **kw), GpuJpegLoader(root, decode_ahead=3, **kw), 4)


class _CountingBatches:
    """Raw batches 0..n-1 that remember how many were taken."""

    def __init__(self, n):
        self.n, self.taken = n, 0

    def __iter__(self):
        for b in range(self.n):
            self.taken += 1
            yield b


@pytest.mark.parametrize('ahead', [0, 1, 3])
def test_prepared_ahead_keeps_order_and_runs_off_the_calling_thread(ahead):
    import random
    import threading
    import time
    threads = set()

    def prepare(b, raw):
        threads.add(threading.get_ident())
        time.sleep(random.Random(b).uniform(0, 0.01))  # uneven work must not reorder batches
        return torch.tensor([b, raw]),

    got = [int(out[0][1]) for out in prepared_ahead(_CountingBatches(7), prepare, ahead, 'cpu')]
    assert got == list(range(7))
    assert (threading.get_ident() in threads) == (ahead == 0)


def test_prepared_ahead_stops_early_and_passes_errors_on():
    import threading
    raw = _CountingBatches(100)
    it = prepared_ahead(raw, lambda b, r: (torch.tensor(r),), 2, 'cpu')
    assert [int(next(it)[0]) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops: nothing more is read, and the thread ends
    assert raw.taken == 3 + 2
    assert not any(t.name.startswith('prepare-batches') for t in threading.enumerate())

    def fail_at_4(b, r):
        if b == 4:
            raise ValueError('corrupt batch 4')
        return torch.tensor(r),

    it = prepared_ahead(_CountingBatches(10), fail_at_4, 2, 'cpu')
    assert [int(next(it)[0]) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match='corrupt batch 4'):
        next(it)


def test_default_cache_size(tmp_path):
    same = write_folder(tmp_path / 'same', [(40, 30)] * 3, classes=('a',))
    mixed = write_folder(tmp_path / 'mixed', [(40, 30), (30, 30)], classes=('a',))
    assert default_cache_size(sorted(map(str, same.rglob('*.jpg'))), 32) == 30
    assert default_cache_size(sorted(map(str, mixed.rglob('*.jpg'))), 32) == round(32 * 1.15)


def test_gpu_cache_says_when_it_keeps_the_images_below_their_size(tmp_path):
    from util.gpu_data import cache_resolution_note
    large = write_folder(tmp_path / 'large', [(60, 40), (50, 44), (70, 30)], classes=('a',))
    paths = sorted(map(str, large.rglob('*.jpg')))
    note = cache_resolution_note(paths, 32)  # shorter sides 40, 44, 30: median 40
    assert note.startswith('note: gpu-cache keeps the images at 32 px') and '--cache_size 40 keeps them' in note
    assert cache_resolution_note(paths, 40) is None


def test_gpu_cache_names_the_file_it_cannot_decode(tmp_path):
    from util.data import UnreadableImage
    from util.gpu_data import decode_to_cache
    root = write_folder(tmp_path / 'train', [(40, 30)] * 3, classes=('a',))
    bad = root / 'a' / 'bad.jpg'
    bad.write_bytes((root / 'a' / '0.jpg').read_bytes()[:200])  # a JPEG cut short
    with pytest.raises(UnreadableImage, match=f'cannot decode {bad}'):
        decode_to_cache(sorted(map(str, root.rglob('*.jpg'))), 24, log=quiet)
    bad.write_text('not an image')  # the header cannot be read either: sizing the cache names it
    with pytest.raises(UnreadableImage, match=f'cannot decode {bad}'):
        GpuCacheLoader(root, 24, batch_size=1, seed=0, num_workers=0, world_size=1, rank=0, device='cpu',
                       log=quiet)


def quiet(*args, **kwargs):
    pass


def test_gpu_cache_loader_on_cpu(tmp_path):
    root = write_folder(tmp_path / 'train', [(40, 30), (30, 44), (50, 50), (36, 28), (60, 40), (32, 32), (48, 36)])
    n = 14
    loaders = [GpuCacheLoader(root, 24, batch_size=2, seed=3, num_workers=0, world_size=2, rank=r,
                              device='cpu', log=quiet) for r in (0, 1)]
    first = loaders[0]
    assert first.cache_size == round(24 * 1.15)
    assert first.images.shape == (n, 3, 28, 28) and first.images.dtype == torch.uint8
    # the cache holds each image's shorter side resized to S, centre-cropped
    path = first.dataset.samples[5][0]
    with Image.open(path) as im:
        ref = TF.pil_to_tensor(TF.center_crop(TF.resize(im.convert('RGB'), 28,
                                                        interpolation=InterpolationMode.BICUBIC), [28, 28]))
    assert torch.equal(first.images[5], ref)
    assert len(first.dataset) == n and first.dataset.root == str(root)
    assert len(first) == (n // 2) // 2  # 7 samples per rank, batches of 2, drop_last

    for loader in loaders:
        loader.sampler.set_epoch(1)
    shards = [set(loader.batch_indices().flatten().tolist()) for loader in loaders]
    assert not shards[0] & shards[1]
    # EpochSampler semantics: the rank's DistributedSampler order, cut into batches
    ref_sampler = EpochSampler(first.dataset, num_replicas=2, rank=0, shuffle=True, seed=3, drop_last=True)
    ref_sampler.set_epoch(1)
    assert first.batch_indices().flatten().tolist() == [i for _, i in ref_sampler][:len(first) * 2]

    batches = list(first)
    assert len(batches) == len(first)
    for b, (images, targets) in enumerate(batches):
        idx = first.batch_indices()[b]
        assert images.shape == (2, 3, 24, 24)
        assert targets.tolist() == [first.dataset.targets[i] for i in idx]
        expect = augment_images(first.images[idx], batch_generator(3, 1, b, 0), 24)
        assert torch.equal(images, expect)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, list(first)))
    first.sampler.set_epoch(2)
    assert not torch.equal(next(iter(first))[0], batches[0][0])
    # another rank draws other crops for its batch 0
    assert not torch.equal(next(iter(loaders[1]))[0], batches[0][0])


def test_gpu_cache_loader_drives_the_training_loop(tmp_path):
    """engine_pretrain.train_one_epoch runs on the gpu-cache loader (device cpu here)."""
    import models_mim
    from engine_pretrain import ModelHandle, train_one_epoch
    from util.lr_sched import PlainSchedule
    root = write_folder(tmp_path / 'train', [(40, 40)] * 4)
    loader = GpuCacheLoader(root, 32, batch_size=4, seed=0, num_workers=0, world_size=1, rank=0,
                            device='cpu', log=quiet)
    assert loader.cache_size == 40
    model = models_mim.build_model('MIM_vit_tiny_patch16', img_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args = argparse.Namespace(accum_iter=1, batch_size=4, print_freq=1, mask_ratio=0.75, amp='none')
    schedule = PlainSchedule(optimizer, 1e-4, 0.0, 0, 1, len(loader))
    loader.sampler.set_epoch(0)
    stats = train_one_epoch(ModelHandle(model, lambda m: m), loader, optimizer, torch.device('cpu'), 0,
                            None, schedule, args)
    assert math.isfinite(stats['loss'])


# ---- choosing a backend ---------------------------------------------------------------------------
@pytest.mark.parametrize('backend', ['gpu', 'gpu-cache'])
def test_build_loader_refuses_cpu(tmp_path, backend):
    root = write_folder(tmp_path / 'train', [(40, 30)] * 4)
    with pytest.raises(SystemExit, match=r'error: --data_backend .* needs a CUDA device'):
        build_loader(backend, str(tmp_path), 32, 2, 0, 0, False, 1, 0, device='cpu')
    loader = build_loader('pil', str(root), 32, 2, 0, 0, False, 1, 0, device='cpu')
    images, _ = next(iter(loader))
    assert images.shape == (2, 3, 32, 32)


def test_run_pretrain_flag_parses():
    from run_pretrain import get_args_parser
    parser = get_args_parser()
    assert parser.parse_args([]).data_backend == 'pil'
    args = parser.parse_args(['--data_backend', 'gpu-cache', '--cache_size', '144'])
    assert args.data_backend == 'gpu-cache' and args.cache_size == 144
    with pytest.raises(SystemExit):
        parser.parse_args(['--data_backend', 'nvidia'])


def test_run_pretrain_cpu_decode_share_with_pil_is_a_clear_error(tmp_path):
    write_folder(tmp_path / 'data' / 'train', [(40, 40)] * 4)
    res = run_pretrain('--data_path', tmp_path / 'data', '--output_dir', tmp_path / 'out', '--epochs', '1',
                       '--cpu_decode_share', '0.3', timeout=120)
    assert res.returncode != 0 and 'Traceback' not in res.output, res.describe()
    assert 'error: --cpu_decode_share applies to --data_backend gpu only (got pil)' in res.output, res.describe()


def test_input_bound_hint():
    from util.gpu_data import input_bound_hint
    assert input_bound_hint('pil', 1.0, 10.0) is None  # 10% waiting: the model set the speed
    pil = input_bound_hint('pil', 4.5, 10.0)
    assert pil.startswith('note: the step waited for its input 45% of this epoch (4.5 of 10.0 s)')
    assert '--data_backend gpu' in pil and 'gpu-cache' in pil
    assert '--cpu_decode_share' in input_bound_hint('gpu', 3.0, 10.0, cpu_decode_share=0.0)
    assert '--cpu_decode_share' not in input_bound_hint('gpu', 3.0, 10.0, cpu_decode_share=0.5)
    assert input_bound_hint('pil', 9.0, 10.0, device_type='cpu') is None  # no GPU backend to suggest
    assert input_bound_hint('gpu-cache', 9.0, 10.0) is None and input_bound_hint('pil', 0.0, 0.0) is None


def test_run_pretrain_prints_the_input_hint_once_from_the_second_epoch(tmp_path, monkeypatch, capsys):
    import run_pretrain
    calls = []

    def hint(backend, wait_s, epoch_s, share, device_type):
        calls.append((backend, device_type))
        return f'HINT {len(calls)}'
    monkeypatch.setattr(run_pretrain, 'input_bound_hint', hint)
    write_folder(tmp_path / 'data' / 'train', [(40, 30)] * 4)
    args = run_pretrain.get_args_parser().parse_args(
        ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--device', 'cpu',
         '--epochs', '3', '--warmup_epochs', '0', '--num_workers', '0', '--data_path', str(tmp_path / 'data'),
         '--output_dir', str(tmp_path / 'out')])
    run_pretrain.main(args)
    out = capsys.readouterr().out
    assert calls == [('pil', 'cpu')] and out.count('HINT') == 1  # epoch 1 only: not epoch 0, not again


def test_run_pretrain_gpu_backend_on_cpu_is_a_clear_error(tmp_path):
    write_folder(tmp_path / 'data' / 'train', [(40, 40)] * 4)
    res = run_pretrain('--data_path', tmp_path / 'data', '--output_dir', tmp_path / 'out', '--epochs', '1',
                       '--data_backend', 'gpu', timeout=120)
    assert res.returncode != 0, res.describe()
    assert 'error' in res.output and '--data_backend gpu' in res.output, res.describe()
    assert 'CUDA' in res.output and 'Traceback' not in res.output, res.describe()
