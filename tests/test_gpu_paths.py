"""GPU integration checks: the code paths a CPU cannot run (nvjpeg decode, grid_sample and the
decode-ahead thread on CUDA streams, the gpu / gpu-cache backends in real runs, bf16 and fp16
with GradScaler, inductor compile, NCCL through torchrun, fine-tuning and kNN on the GPU).
Skipped without a CUDA GPU; on the device machine measure_gpu.sh runs them (stage 6):

    python3 -m pytest -q tests/test_gpu_paths.py
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models_mim
from helpers import DDP_STRIDE_WARNING, free_port, grad_layout_mismatches, run_cmd, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA GPU (run on the device machine: ViT/measure_gpu.sh stage 6)')

TINY = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '64', '--batch_size', '8', '--device', 'cuda',
        '--num_workers', '2', '--print_freq', '2', '--warmup_epochs', '0', '--blr', '1e-3']


def gpu_env() -> dict:
    env = subprocess_env()
    env.pop('CUDA_VISIBLE_DEVICES')  # subprocess_env hides GPUs from the CPU tests
    if 'CUDA_VISIBLE_DEVICES' in os.environ:
        env['CUDA_VISIBLE_DEVICES'] = os.environ['CUDA_VISIBLE_DEVICES']
    return env


def run_ok(cmd: list, timeout: float = 300):
    res = run_cmd([str(c) for c in cmd], timeout=timeout, env=gpu_env())
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    return res


def epochs_ok(output_dir: Path, epochs: int) -> list[dict]:
    log = [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines() if line.strip()]
    assert len(log) == epochs
    assert all(math.isfinite(e['train_loss']) for e in log)
    return log


def smooth_jpegs(folder: Path, sizes, seed: int = 0) -> list[Path]:
    """Smooth colour images (so decoders differ little) as baseline, progressive and greyscale JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        coarse = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        path = folder / f'{i}.jpg'
        if i % 5 == 3:
            im.convert('L').save(path, quality=95)
        else:
            im.save(path, quality=95, progressive=(i % 5 == 4))
        paths.append(path)
    return paths


SIZES = [(500, 375), (375, 500), (333, 251), (640, 480), (97, 131), (500, 500), (211, 157), (300, 200)]


def test_nvjpeg_decode_matches_the_cpu_decoder(tmp_path):
    from torchvision.io import ImageReadMode, decode_image, read_file

    from util import gpu_data
    from util.gpu_data import decode_batch
    data = [read_file(str(p)) for p in smooth_jpegs(tmp_path, SIZES)]
    refusals = gpu_data._refusals
    gpu = decode_batch(data, 'cuda')
    assert gpu_data._refusals == refusals, 'nvjpeg refused the batch: it was decoded on the CPU instead'
    for i, (d, g) in enumerate(zip(data, gpu)):
        cpu = decode_image(d, mode=ImageReadMode.RGB)
        assert g.device.type == 'cuda' and g.dtype == torch.uint8 and g.shape == cpu.shape
        diff = g.cpu().float() - cpu.float()  # (3, H, W)
        # The two decoders differ in IDCT rounding and chroma upsampling: nvjpeg (CUDA 13) vs
        # libjpeg-turbo gave a mean absolute difference of 2.99 levels on an H200 (2026-11-28).
        # A wrong decode (swapped channels, another layout, another image) differs by tens;
        # and upsampling or rounding does not shift a channel's mean, a colour-space mix-up does.
        assert diff.abs().mean() < 4.0, f'image {i} {SIZES[i]}: mean |diff| {diff.abs().mean():.2f}'
        channel_shift = diff.mean(dim=(1, 2)).abs().max()
        assert channel_shift < 1.5, f'image {i} {SIZES[i]}: a channel mean moved by {channel_shift:.2f}'


@pytest.mark.parametrize('mode', ['bicubic', 'pil'])
def test_augmentation_on_cuda_matches_cpu(mode):
    from util.gpu_data import augment_images, batch_generator
    # 'pil' rounds to 8 bits after each pass: a sum that lands on .5 may round the other way
    atol = 2e-3 if mode == 'bicubic' else 1.01 / 255 / 0.224
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for w, h in SIZES]
    cpu = augment_images(images, batch_generator(1, 2, 3, 0), 224, mode=mode)
    cuda = augment_images([im.cuda() for im in images], batch_generator(1, 2, 3, 0), 224, mode=mode)
    assert cuda.device.type == 'cuda'
    assert torch.allclose(cuda.cpu(), cpu, atol=atol)
    square = torch.randint(0, 256, (8, 3, 128, 128), generator=g, dtype=torch.uint8)
    assert torch.allclose(augment_images(square.cuda(), batch_generator(0, 0, 0, 0), 112, mode=mode).cpu(),
                          augment_images(square, batch_generator(0, 0, 0, 0), 112, mode=mode), atol=atol)


def test_decode_ahead_on_cuda_streams_is_safe_while_the_consumer_lags(tmp_path):
    """Batches made on the side stream equal the inline ones even when the consumer's stream is
    busy (a slow step): without the event wait the step would read half-written batches, without
    record_stream the next batch could reuse their memory."""
    from util.gpu_data import GpuJpegLoader
    root = tmp_path / 'train'
    for c in ('a', 'b'):
        smooth_jpegs(root / c, SIZES, seed=ord(c))
    kw = dict(input_size=96, batch_size=4, seed=0, num_workers=2, world_size=1, rank=0, device='cuda')
    expect = [(x.clone(), y.clone()) for x, y in GpuJpegLoader(root, decode_ahead=0, **kw)]
    got = []
    for x, y in GpuJpegLoader(root, decode_ahead=2, **kw):
        torch.cuda._sleep(50_000_000)  # the consumer's stream is busy for a while
        got.append((x.clone(), y.clone()))  # queued behind the sleep; x is dropped right after
    torch.cuda.synchronize()
    assert len(got) == len(expect) == 4
    for (x, y), (ex, ey) in zip(got, expect):
        assert torch.equal(y, ey)
        assert torch.allclose(x, ex, atol=1e-5)


def test_cpu_decode_share_on_cuda_matches_nvjpeg_batches(tmp_path):
    """--cpu_decode_share: the workers' libjpeg images, copied to the GPU, join nvjpeg's in the same
    crops and flips; the batches differ from all-nvjpeg ones by decoder rounding only."""
    from util import gpu_data
    from util.gpu_data import GpuJpegLoader
    root = tmp_path / 'train'
    for c in ('a', 'b'):
        smooth_jpegs(root / c, SIZES, seed=ord(c))
    kw = dict(input_size=96, batch_size=4, seed=0, num_workers=2, world_size=1, rank=0, device='cuda')
    refusals = gpu_data._refusals
    nvjpeg = [(x.cpu(), y.cpu()) for x, y in GpuJpegLoader(root, **kw)]
    loader = GpuJpegLoader(root, cpu_decode_share=0.5, pin_memory=True, **kw)
    _, lengths, pixels, shapes, _, _ = next(iter(loader.loader))  # a raw batch: half of it decoded
    assert shapes.shape == (2, 2) and lengths.shape == (2,) and pixels.is_pinned()
    hybrid = [(x.cpu(), y.cpu()) for x, y in loader]
    assert gpu_data._refusals == refusals
    assert len(nvjpeg) == len(hybrid) == 4
    for (x, y), (hx, hy) in zip(nvjpeg, hybrid):
        assert torch.equal(y, hy)
        assert (x - hx).abs().mean() < 0.05  # normalised units: about 3 grey levels / 255 / 0.22


def race_loader(tmp_path: Path, ahead: int):
    """A gpu-backend loader over 32 baseline JPEGs of one size (so freed blocks fit the next
    batch's images exactly), 8 batches an epoch."""
    from util.gpu_data import GpuJpegLoader
    root = tmp_path / 'train'
    for c in ('a', 'b'):
        smooth_jpegs(root / c, [(500, 375)] * 16, seed=ord(c))
    for f in root.rglob('*.jpg'):  # baseline colour JPEGs only: the hardware decoder's path
        Image.open(f).convert('RGB').save(f, quality=90)
    return GpuJpegLoader(root, 96, batch_size=4, seed=0, num_workers=0, world_size=1, rank=0, device='cuda',
                         decode_ahead=ahead)


def batches_with_reads_held_back(loader, monkeypatch) -> tuple[list[torch.Tensor], bool]:
    """One warm-up epoch, then an epoch whose canvas copies (the reads of the decoded images)
    wait behind a long kernel; batches kept on the GPU, no sync in between. Returns the batches
    and whether the training stream was still busy when the epoch's loop ended."""
    import util.gpu_data as gd
    list(loader)
    torch.cuda.synchronize()
    make_canvas = gd.make_canvas

    def slow_make_canvas(images):
        torch.cuda._sleep(100_000_000)  # the copies below wait in the queue behind this
        return make_canvas(images)

    monkeypatch.setattr(gd, 'make_canvas', slow_make_canvas)
    loader.sampler.set_epoch(1)
    batches = [x for x, _ in loader]
    busy = not torch.cuda.current_stream().query()
    monkeypatch.setattr(gd, 'make_canvas', make_canvas)
    torch.cuda.synchronize()
    return batches, busy


def corrupted_batches(loader, batches: list[torch.Tensor]) -> list[int]:
    """Batches that differ from their own images decoded on the CPU (nvjpeg vs libjpeg-turbo
    differ by a grey level or so; another image differs by far more)."""
    import util.gpu_data as gd
    from torchvision.io import ImageReadMode, decode_image, read_file
    indices = [i for _, i in loader.sampler]
    bad = []
    for b, x in enumerate(batches):
        decoded = [decode_image(read_file(loader.dataset.samples[i][0]), mode=ImageReadMode.RGB).cuda()
                   for i in indices[4 * b:4 * b + 4]]
        expect = gd.augment_images(decoded, gd.batch_generator(0, 1, b, 0), 96)
        if (x - expect).abs().mean() > 0.05:
            bad.append(b)
    return bad


@pytest.mark.parametrize('ahead', [0, 2])
def test_decoded_images_are_not_overwritten_while_queued_work_reads_them(tmp_path, monkeypatch, ahead):
    """torchvision allocates decode outputs on the current stream but nvjpeg writes them from
    another (pytorch/vision PR 9606): a block freed while queued kernels still read it must not
    be handed to the decoder. decode_batch decodes on a stream of its own to prevent that."""
    loader = race_loader(tmp_path, ahead)
    batches, busy = batches_with_reads_held_back(loader, monkeypatch)
    assert len(batches) == 8
    if ahead == 0:
        assert busy, 'the harness synchronised somewhere: the reads were not held back'
    assert corrupted_batches(loader, batches) == []


def test_the_race_harness_catches_decoding_on_the_callers_stream(tmp_path, monkeypatch):
    """Positive control for the test above: decoding on the caller's stream (torchvision's
    behaviour without decode_batch's own stream) should corrupt batches in the same harness."""
    import util.gpu_data as gd
    loader = race_loader(tmp_path, 0)
    monkeypatch.setattr(gd, 'decode_batch',
                        lambda data, device, names=None: gd._decode(data, torch.device(device), names))
    batches, busy = batches_with_reads_held_back(loader, monkeypatch)
    bad = corrupted_batches(loader, batches)
    if not bad:
        pytest.skip(f'decoding on the caller\'s stream corrupted nothing here (stream busy: {busy}); the test '
                    f'above then shows correctness, not protection')
    assert busy


def test_the_decode_stream_is_not_a_shared_pool_stream():
    import util.gpu_data as gd
    dev = torch.device('cuda', torch.cuda.current_device())
    own = gd._stream('decode', dev)
    others = [torch.cuda.Stream(dev) for _ in range(40)] + [gd._stream('prepare', dev), torch.cuda.current_stream(dev)]
    assert all(own != other for other in others)
    assert gd._stream('decode', dev) == own  # one per device for the whole process


@pytest.fixture(scope='module')
def gpu_cache_run(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp('gpu_cache_run')
    res = run_ok([sys.executable, 'run_pretrain.py', *TINY, '--data_backend', 'gpu-cache', '--epochs', '2',
                  '--t_0', '0.5', '--how_scale', 'linear', '--data_path', demo_data, '--output_dir', out])
    return out, res


def test_gpu_cache_backend_pretrains_with_freezeout(gpu_cache_run):
    out, res = gpu_cache_run
    epochs_ok(out, 2)
    assert 'FreezeOut: step' in res.stdout and 'gpu-cache:' in res.stdout
    assert (out / 'checkpoint-1.pth').is_file()


def test_gpu_backend_pretrains_with_freezeout_in_bf16(demo_data, tmp_path):
    # PIL's resampling; a quarter of each batch decoded by the workers (pinned by the loader), the rest by nvjpeg
    res = run_ok([sys.executable, 'run_pretrain.py', *TINY, '--data_backend', 'gpu', '--cpu_decode_share', '0.25',
                  '--amp', 'bf16', '--gpu_resample', 'pil',
                  '--epochs', '2', '--t_0', '0.5', '--how_scale', 'linear', '--data_path', demo_data,
                  '--output_dir', tmp_path])
    epochs_ok(tmp_path, 2)
    assert 'FreezeOut: step' in res.stdout


def test_torchrun_nccl_pil_fp16_freezeout(demo_data, tmp_path):
    """NCCL process group, DDP rebuilt at freeze events, fp16 with GradScaler, pinned pil batches."""
    res = run_ok([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port',
                  free_port(), 'run_pretrain.py', *TINY, '--data_backend', 'pil', '--amp', 'fp16', '--epochs', '2',
                  '--t_0', '0.5', '--how_scale', 'linear', '--data_path', demo_data, '--output_dir', tmp_path])
    assert 'backend nccl' in res.stdout
    assert DDP_STRIDE_WARNING not in res.output, res.describe()
    epochs_ok(tmp_path, 2)
    assert 'FreezeOut: step' in res.stdout


@pytest.mark.parametrize('amp', [torch.bfloat16, torch.float16])
def test_cuda_gradients_have_their_parameters_strides(amp):
    """cuDNN picks the head convs' gradient layout on the GPU: it must be the parameters' (else DDP
    copies each such gradient and warns)."""
    model = models_mim.MIM_vit_tiny_patch16(img_size=64).cuda()
    with torch.autocast('cuda', dtype=amp):
        loss = model(torch.randn(2, 3, 64, 64, device='cuda'), mask_ratio=0.75)
    loss.backward()
    assert grad_layout_mismatches(model) == []


def test_finetune_and_knn_on_gpu(gpu_cache_run, demo_data, tmp_path):
    ckpt = gpu_cache_run[0] / 'checkpoint-1.pth'
    common = ['--model', 'vit_tiny_patch16', '--finetune', ckpt, '--input_size', '64', '--device', 'cuda',
              '--data_path', demo_data, '--num_workers', '2']
    run_ok([sys.executable, 'run_finetune.py', *common, '--epochs', '1', '--warmup_epochs', '0',
            '--batch_size', '8', '--output_dir', tmp_path / 'ft', '--print_freq', '2'])
    ft = [json.loads(line) for line in (tmp_path / 'ft' / 'log.txt').read_text().splitlines() if line.strip()]
    assert 0 <= ft[-1]['test_acc1'] <= 100
    run_ok([sys.executable, 'run_knn.py', *common, '--batch_size', '8', '--linear_epochs', '2',
            '--output_dir', tmp_path / 'knn'])
    modes = {json.loads(line)['mode'] for line in (tmp_path / 'knn' / 'log.txt').read_text().splitlines()
             if line.strip()}
    assert modes == {'knn', 'linear'}


def test_inductor_compile_trains(demo_data, tmp_path):  # last: a cold inductor compile takes longest
    run_ok([sys.executable, 'run_pretrain.py', *TINY, '--data_backend', 'gpu-cache', '--compile', '--epochs', '1',
            '--data_path', demo_data, '--output_dir', tmp_path], timeout=600)
    epochs_ok(tmp_path, 1)
