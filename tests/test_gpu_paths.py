"""GPU integration checks: the code paths a CPU cannot run (nvjpeg decode, grid_sample and the
decode-ahead thread on CUDA streams, the gpu / gpu-cache backends in real runs, bf16 and fp16
with GradScaler, inductor compile, NCCL through torchrun, fine-tuning and kNN on the GPU).
Skipped without a CUDA GPU; on the device machine measure_gpu.sh runs them (stage 5):

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

from helpers import free_port, run_cmd, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA GPU (run on the device machine: ViT/measure_gpu.sh stage 5)')

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

    from util.gpu_data import decode_batch
    data = [read_file(str(p)) for p in smooth_jpegs(tmp_path, SIZES)]
    gpu = decode_batch(data, 'cuda')
    for d, g in zip(data, gpu):
        cpu = decode_image(d, mode=ImageReadMode.RGB)
        assert g.device.type == 'cuda' and g.dtype == torch.uint8 and g.shape == cpu.shape
        assert (g.cpu().float() - cpu.float()).abs().mean() < 2.0  # IDCT / chroma upsampling differences


def test_augmentation_on_cuda_matches_cpu():
    from util.gpu_data import augment_images, batch_generator
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for w, h in SIZES]
    cpu = augment_images(images, batch_generator(1, 2, 3, 0), 224)
    cuda = augment_images([im.cuda() for im in images], batch_generator(1, 2, 3, 0), 224)
    assert cuda.device.type == 'cuda'
    assert torch.allclose(cuda.cpu(), cpu, atol=2e-3)
    square = torch.randint(0, 256, (8, 3, 128, 128), generator=g, dtype=torch.uint8)
    assert torch.allclose(augment_images(square.cuda(), batch_generator(0, 0, 0, 0), 112).cpu(),
                          augment_images(square, batch_generator(0, 0, 0, 0), 112), atol=2e-3)


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
    res = run_ok([sys.executable, 'run_pretrain.py', *TINY, '--data_backend', 'gpu', '--amp', 'bf16',
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
    epochs_ok(tmp_path, 2)
    assert 'FreezeOut: step' in res.stdout


def test_inductor_compile_trains(demo_data, tmp_path):
    run_ok([sys.executable, 'run_pretrain.py', *TINY, '--data_backend', 'gpu-cache', '--compile', '--epochs', '1',
            '--data_path', demo_data, '--output_dir', tmp_path], timeout=600)
    epochs_ok(tmp_path, 1)


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
