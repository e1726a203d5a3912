"""ViT/benchmark.py: a tiny CPU run end to end (outputs, keys, types), the reference step's
upstream forward against the model's own, the FreezeOut freezing it times, and the schedule
average's weighting."""
import argparse
import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import models_mim
from helpers import VIT, run_cmd, subprocess_env
from util import flops
from util import freezeout as fo

TINY = ['--device', 'cpu', '--model', 'MIM_vit_tiny_patch16', '--input_size', '64', '--batch_size', '8',
        '--steps', '2', '--warmup', '1']


def write_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(40 + 3 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f'{i}.jpg', quality=90)


def run_benchmark(*flags, timeout=180):
    res = run_cmd([sys.executable, 'benchmark.py', *map(str, flags)], timeout=timeout, cwd=VIT,
                  env=subprocess_env())
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    return res


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_cpu_run_writes_results_and_skips_gpu_backends(tmp_path):
    data = tmp_path / 'data'
    write_images(data / 'train' / 'a', 5)
    write_images(data / 'train' / 'b', 5, seed=1)
    out = tmp_path / 'out'
    res = run_benchmark(*TINY, '--out', out, '--data_path', data, '--repeat', '2', '--num_workers', '0',
                        '--backends', 'pil', 'gpu', 'gpu-cache', '--cpu_decode_shares', '0', '0.5',
                        '--gpu_resample', 'pil')
    result = json.loads((out / 'benchmark.json').read_text())
    assert result['gpu_resample'] == 'pil' and 'gpu / gpu-cache resize crops with --gpu_resample pil' in result['notes']
    for key in ('device', 'model', 'batch_size', 'input_size', 'reference_step_img_per_s', 'freeze_img_per_s',
                'ks', 'schedule_average_img_per_s', 'speedup_vs_reference', 'flops_estimate', 'loader_img_per_s',
                'command', 'date'):
        assert key in result, key
    assert result['device'] == 'cpu' and result['model'] == 'MIM_vit_tiny_patch16'
    assert result['batch_size'] == 8 and result['input_size'] == 64
    assert isinstance(result['command'], list) and '--batch_size' in result['command']
    assert isinstance(result['date'], str) and result['date'][:2] == '20'
    assert positive(result['reference_step_img_per_s'])
    assert result['ks'] == list(range(13))  # ViT-Ti: patch embedding + 12 blocks
    assert len(result['freeze_img_per_s']) == len(result['ks'])
    assert all(positive(v) for v in result['freeze_img_per_s'])
    # the timing noise of every figure: its two halves' rates, relative difference
    spreads = [result['reference_spread'], *result['freeze_spread']]
    assert len(spreads) == 14 and all(0 <= x < 2 for x in spreads)
    assert positive(result['schedule_average_img_per_s'])
    assert set(result['speedup_vs_reference']) == {'project_k0', 'schedule_average'}
    assert all(positive(v) for v in result['speedup_vs_reference'].values())
    assert positive(result['flops_estimate']['speedup'])
    assert all(positive(v) for v in result['projected_epoch_s'].values())
    # input backends: pil measured; the GPU ones skipped with a note on a CPU device
    assert set(result['loader_img_per_s']) == {'pil'} and positive(result['loader_img_per_s']['pil'])
    # end to end: the project step on pil's real batches, nothing frozen and all but the last layer
    assert set(result['end_to_end_img_per_s']) == {'pil'}
    assert set(result['end_to_end_img_per_s']['pil']) == {'0', '12'}
    assert all(positive(v) for v in result['end_to_end_img_per_s']['pil'].values())
    for backend in ('gpu', 'gpu (cpu decode 0.5)', 'gpu-cache'):  # the gpu backend at each CPU decode share
        assert any(f'loader {backend} skipped' in n and 'CUDA' in n for n in result['notes']), result['notes']
    assert result['cpu_decode_shares'] == [0.0, 0.5]
    md = (out / 'benchmark.md').read_text()
    assert '| project, 12 layers frozen |' in md and 'upstream reference' in md and '| pil |' in md
    assert 'step on its batches, k=12' in md and 'of synthetic' in md and 'Timing noise: ' in md
    png = (out / 'benchmark_freeze.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
    assert 'schedule average' in res.stdout and '[project] k=12' in res.stdout
    assert ', 0 workers)' in res.stdout  # the pil loader's line
    assert any(n.startswith('CPU: the reference runs in fp32') for n in result['notes'])


def test_cpu_run_subset_of_ks_without_data(tmp_path):
    out = tmp_path / 'out'
    run_benchmark(*TINY, '--out', out, '--ks', '0', '6', '12', '--skip_reference')
    result = json.loads((out / 'benchmark.json').read_text())
    assert result['ks'] == [0, 6, 12] and len(result['freeze_img_per_s']) == 3
    assert len(result['warmup_s']) == 3 and all(positive(w) for w in result['warmup_s'])
    assert 'Warm-up per k (untimed): k=0 ' in (out / 'benchmark.md').read_text()
    assert 'partial' not in result and not any(n.startswith('partial') for n in result['notes'])  # finished
    assert result['loader_img_per_s'] == {} and result['end_to_end_img_per_s'] == {}
    assert result['reference_step_img_per_s'] is None
    assert not any('reference runs in' in n for n in result['notes'])  # --skip_reference: no note about it
    assert positive(result['schedule_average_img_per_s'])
    assert any('interpolates' in n for n in result['notes'])


@pytest.mark.parametrize('flags', [['--ks', '13'], ['--e2e_ks', '0', '13'], ['--decode_ahead', '-1'],
                                   ['--cpu_decode_shares', '0', '1.5'], ['--input_size', '40'],
                                   ['--data_path', '/nonexistent/imagenet']])  # refused before any timing
def test_bad_flags_are_a_clear_error(tmp_path, flags):
    res = run_cmd([sys.executable, 'benchmark.py', *TINY, '--out', tmp_path / 'out', *flags, '--skip_reference'],
                  timeout=120, cwd=VIT, env=subprocess_env())
    assert res.returncode != 0 and 'error' in res.output and 'Traceback' not in res.output, res.describe()
    assert not (tmp_path / 'out').exists() and 'benchmark: ' not in res.output, res.describe()  # nothing started


def test_an_out_that_cannot_hold_the_results_is_refused_before_the_timings(tmp_path, monkeypatch):
    """--out is checked at start-up, not at the first write after the reference timing (minutes on a
    GPU): a file, a path under a file, and a folder that refuses files (a read-only mount;
    simulated, since root writes through chmod)."""
    import errno

    import util.cli

    def not_before_the_checks(*args, **kwargs):
        raise AssertionError('a step was built before --out was checked')
    monkeypatch.setattr(benchmark, 'ReferenceStep', not_before_the_checks)
    monkeypatch.setattr(benchmark, 'ProjectStep', not_before_the_checks)
    afile = tmp_path / 'afile'
    afile.write_text('')
    for out in (afile, afile / 'bench'):
        with pytest.raises(SystemExit, match=f'^error: cannot create --out {out}: {afile} is a file, not a folder$'):
            benchmark.main([*TINY, '--out', str(out)])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system')
    monkeypatch.setattr(util.cli.tempfile, 'TemporaryFile', read_only)
    with pytest.raises(SystemExit, match=f'^error: cannot write into --out {tmp_path}: Read-only file system$'):
        benchmark.main([*TINY, '--out', str(tmp_path)])


def test_a_run_cut_short_keeps_the_ks_it_timed(tmp_path, monkeypatch):
    """benchmark.json is written after every k but the last, so a time limit (e.g. while
    compiling the next k) leaves the figures measured so far, marked partial."""
    real_time_runs, calls = benchmark.time_runs, []

    def killed_at_the_third_k(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a time limit's signal would
        return real_time_runs(*args, **kwargs)
    monkeypatch.setattr(benchmark, 'time_runs', killed_at_the_third_k)
    out = tmp_path / 'out'
    with pytest.raises(KeyboardInterrupt):
        benchmark.main([*TINY, '--ks', '0', '6', '12', '--skip_reference', '--out', str(out)])
    saved = json.loads((out / 'benchmark.json').read_text())
    assert saved['ks'] == [0, 6] and len(saved['freeze_img_per_s']) == 2 and positive(saved['freeze_img_per_s'][1])
    assert len(saved['warmup_s']) == 2
    assert 'partial: k = [12] not measured yet' in saved['notes'] and saved['partial'] == [12]
    assert not list(out.glob('*.tmp'))  # written whole, then renamed
    assert positive(saved['schedule_average_img_per_s'])
    assert 'partial' in (out / 'benchmark.md').read_text()


def test_time_runs_splits_warm_up_from_timed_steps(monkeypatch):
    """The warm-up's seconds (compilation, under --compile) are reported apart from the timed ones."""
    clock = [0.0]
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: clock[0])

    def run(n):  # a first call as slow as a compilation
        clock[0] += 100.0 if not run.calls else n
        run.calls += 1
    run.calls = 0
    warm, seconds, spread = benchmark.time_runs(run, 5, 3, torch.device('cpu'))
    assert (warm, seconds) == (100.0, 3.0)
    assert spread == 0  # halves of 1 and 2 steps, each at one step per second


def test_time_runs_reports_how_far_its_two_halves_differ(monkeypatch):
    """The timed steps run as two halves; their rates' difference over their mean is the noise."""
    clock = [0.0]
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: clock[0])
    per_call = iter([0.0, 4.0, 6.0])  # warm-up, then 4 steps in 4 s (1/s), then 4 steps in 6 s (2/3 per s)
    monkeypatch.setattr(benchmark, 'sync', lambda device: None)

    def run(n):
        clock[0] += next(per_call)
    warm, seconds, spread = benchmark.time_runs(run, 2, 8, torch.device('cpu'))
    assert (warm, seconds) == (0.0, 10.0)
    assert spread == pytest.approx((1 - 2 / 3) / ((1 + 2 / 3) / 2))  # 20%
    assert benchmark.time_runs(lambda n: None, 0, 1, torch.device('cpu'))[2] is None  # one step: no halves
    line = benchmark.noise_line({'reference_spread': 0.05, 'freeze_spread': [0.01, None, 0.2]})
    assert line.startswith('Timing noise: the two halves of each timed run differed by 5.0% (median of 3) '
                           'and at most 20.0%')
    assert benchmark.noise_line({'freeze_spread': [None]}) is None


def test_a_failing_backend_is_noted_and_the_step_timings_kept(tmp_path, monkeypatch):
    data = tmp_path / 'data'
    write_images(data / 'train' / 'a', 8)
    out = tmp_path / 'out'

    def broken(*args, **kwargs):
        raise RuntimeError('decoder exploded')
    monkeypatch.setattr(benchmark, 'time_loader', broken)
    with pytest.raises(SystemExit, match=r'^error: loader pil failed: RuntimeError: decoder exploded \(the other'):
        benchmark.main([*TINY, '--ks', '0', '--skip_reference', '--data_path', str(data), '--num_workers', '0',
                        '--backends', 'pil', '--out', str(out)])  # exits 1 with the timings written
    saved = json.loads((out / 'benchmark.json').read_text())
    assert 'loader pil failed: RuntimeError: decoder exploded' in saved['notes']
    assert positive(saved['freeze_img_per_s'][0]) and saved['loader_img_per_s'] == {}
    assert 'loader pil failed' in (out / 'benchmark.md').read_text()


def test_error_line_keeps_a_worker_errors_own_message():
    worker = RuntimeError('Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent '
                          'call last):\n  File "x.py", line 1\nRuntimeError: cannot decode /d/a.jpg: truncated\n')
    assert benchmark.error_line(worker) == 'RuntimeError: cannot decode /d/a.jpg: truncated'
    assert benchmark.error_line(RuntimeError('CUDA out of memory.\nmore')) == 'CUDA out of memory.'
    assert benchmark.error_line(RuntimeError()) == ''


def test_a_backend_that_cannot_be_built_or_falls_back_is_noted(tmp_path, monkeypatch):
    """An error building a loader (e.g. out of memory filling the gpu-cache) and batches the GPU
    decoder refused (decoded on the CPU: the rate is not nvjpeg's) end up in the notes."""
    from util import gpu_data
    data = tmp_path / 'data'
    write_images(data / 'train' / 'a', 8)
    real_build = benchmark.build_loader
    flags = [*TINY, '--ks', '0', '--skip_reference', '--data_path', str(data), '--num_workers', '0',
             '--backends', 'pil', '--e2e_ks', '--out', str(tmp_path / 'out')]
    monkeypatch.setattr(benchmark, 'time_loader', lambda *a, **k: 100.0)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError('CUDA out of memory. Tried to allocate 5 GiB')
    monkeypatch.setattr(benchmark, 'build_loader', out_of_memory)
    with pytest.raises(SystemExit, match='error: loader pil failed to build: RuntimeError: CUDA out of memory'):
        benchmark.main(flags)
    result = json.loads((tmp_path / 'out' / 'benchmark.json').read_text())
    assert 'loader pil failed to build: RuntimeError: CUDA out of memory. Tried to allocate 5 GiB' in result['notes']
    assert result['loader_img_per_s'] == {} and positive(result['freeze_img_per_s'][0])

    def refusing(*args, **kwargs):
        loader = real_build(*args, **kwargs)
        monkeypatch.setattr(gpu_data, '_refusals', gpu_data._refusals + 3)  # as if 3 batches were refused
        return loader
    monkeypatch.setattr(benchmark, 'build_loader', refusing)
    result = benchmark.main(flags)
    assert any(n.startswith('loader pil: the batched GPU JPEG decoder refused 3 files') for n in result['notes'])
    assert result['loader_img_per_s'] == {'pil': 100.0}


def test_schedule_average_uses_freezeout_weighting():
    """With time per image proportional to util.flops' step cost, the schedule average is the
    FLOP model's average cost; unmeasured k are interpolated."""
    shape = dataclasses.replace(flops.SHAPES['MIM_vit_base_patch16'])
    L = shape.depth + 1
    ks = list(range(L))
    cost = [flops.step_flops(shape, k) for k in ks]
    got = benchmark.schedule_average(ks, [1.0 / c for c in cost], L, 0.8, 'cubic')
    expect = flops.freezeout_speedup(shape, 0.8, 'cubic')['average_gflops_per_image'] * 1e9
    assert got['interpolated'] == []
    assert math.isclose(1.0 / got['img_per_s'], expect, rel_tol=1e-9)
    assert math.isclose(sum(got['weights']), 1.0, rel_tol=1e-12)
    t = fo.freeze_fractions(L, 0.8, 'cubic')
    assert math.isclose(got['weights'][3], t[3] - t[2])
    # constant rate -> that rate; two measured ends -> linear in time per image between them
    assert math.isclose(benchmark.schedule_average(ks, [100.0] * L, L, 0.5, 'linear')['img_per_s'], 100.0)
    ends = benchmark.schedule_average([0, L - 1], [100.0, 200.0], L, 0.5, 'linear')
    assert ends['interpolated'] == list(range(1, L - 1))
    t = fo.freeze_fractions(L, 0.5, 'linear')
    tpi = [0.01 + (0.005 - 0.01) * k / (L - 1) for k in range(L)]
    manual = sum((t[k] - (t[k - 1] if k else 0.0)) * tpi[k] for k in range(L))
    assert math.isclose(ends['img_per_s'], 1.0 / manual, rel_tol=1e-9)


def test_reference_forward_matches_the_model():
    """The reference's upstream forward (per-channel, per-scale HOG) computes the model's loss."""
    model = models_mim.build_model('MIM_vit_tiny_patch16', img_size=64)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        assert torch.allclose(benchmark.upstream_hog(model, imgs, k), model.HOG(imgs, k), atol=1e-6)
    torch.manual_seed(1)
    ours = benchmark.upstream_forward(model, imgs, 0.75)
    torch.manual_seed(1)
    ref = model(imgs, mask_ratio=0.75)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    ours.backward()
    norm = benchmark.upstream_grad_norm(params)
    assert torch.allclose(norm, torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def test_reference_hog_runs_under_the_active_autocast():
    """Upstream's HOG had no autocast guard: under the reference step's fp16 autocast its Sobel conv
    ran in half precision (bf16 on CPU here), while the project's targets stay float32."""
    model = models_mim.build_model('MIM_vit_tiny_patch16', img_size=64)
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.hog_enc[0].conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = benchmark.upstream_hog(model, imgs, 0)
        ours = model.HOG(imgs, 0)
    hook.remove()
    assert seen == [torch.bfloat16] * 3 + [torch.float32]  # the reference per channel, then ours once
    assert low.dtype == ours.dtype == torch.float32 and low.shape == ours.shape
    assert not torch.equal(low, ours)  # some pixels land in other orientation bins
    assert (low - ours).abs().mean() < 0.05  # but it is the same target


def test_reference_and_project_steps_train_on_cpu():
    device = torch.device('cpu')
    imgs = torch.randn(2, 3, 32, 32)
    ref = benchmark.ReferenceStep('MIM_vit_tiny_patch16', 32, device, 0.75)
    assert isinstance(ref.optimizer, torch.optim.AdamW)
    assert ref.optimizer.defaults['foreach'] is None and ref.optimizer.defaults['fused'] is False  # torch's default kernels
    before = ref.model.blocks[0].mlp.fc1.weight.detach().clone()
    assert math.isfinite(ref.step(imgs))
    assert not torch.equal(before, ref.model.blocks[0].mlp.fc1.weight)


def test_end_to_end_timing_feeds_the_loaders_batches_to_the_step():
    """time_end_to_end trains on the loader's own batches (counted here), k = 0 then k = L-1."""
    args = argparse.Namespace(model='MIM_vit_tiny_patch16', input_size=32, amp='none', mask_ratio=0.75,
                              t_0=0.8, how_scale='cubic', decoder_freeze='tap', compile=False, batch_size=2,
                              warmup=1, steps=3)

    class Loader:
        def __init__(self):
            self.sampler = argparse.Namespace(set_epoch=lambda e: self.epochs.append(e))
            self.served, self.epochs = 0, []

        def __len__(self):
            return 2

        def __iter__(self):
            for _ in range(2):
                self.served += 1
                yield torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64)

    loader = Loader()
    rates = benchmark.time_end_to_end(args, loader, [12, 0], torch.device('cpu'))
    assert list(rates) == ['0', '12'] and all(positive(v) for v in rates.values())
    assert loader.served == 2 * (1 + 3)  # warm-up + timed batches, for each k (no workers to drain)
    assert loader.epochs == [0, 1, 2, 3]


def test_project_step_freezes_exactly_k_layers():
    args = argparse.Namespace(model='MIM_vit_tiny_patch16', input_size=32, amp='none', mask_ratio=0.75,
                              t_0=0.8, how_scale='cubic', decoder_freeze='tap', compile=False)
    step = benchmark.ProjectStep(args, torch.device('cpu'))
    model = step.model
    imgs = torch.randn(2, 3, 32, 32)
    for k in range(model.num_layers):
        step.set_frozen(k)
        assert model.num_frozen == k
        assert model.live_taps == step.schedule.live_taps(step.step_with_frozen(k))
        frozen = [i for i in range(model.num_layers)
                  if not any(p.requires_grad for m in model.layer_modules(i)
                             for p in ([m] if isinstance(m, torch.nn.Parameter) else m.parameters()))]
        assert frozen == list(range(k))
        if k in (0, model.num_layers - 1):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            stats = step.run(imgs, 2)
            assert math.isfinite(stats['loss']) and stats['frozen_layers'] == k
            changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
            assert 'blocks.11.mlp.fc1.weight' in changed  # the last block always trains
            assert ('patch_embed.proj.weight' in changed) == (k == 0)
            assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none)
    assert model.live_taps == [3]  # only the last tap is left at k = L-1
