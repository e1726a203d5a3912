"""ViT/measure_gpu.sh, the one script a lent GPU runs: its CPU smoke mode (QUICK=1) end to end
on stand-in data (every stage, results packed into one archive beside the console log, the
targets summary), a clear error without the data, and benchmark.check_targets' arithmetic."""
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import numpy as np
from PIL import Image

import benchmark
from helpers import ROOT, run_cmd, subprocess_env, warm_nested_runs


def stand_in_data(base: Path) -> Path:
    """Tiny stand-ins for ../shared/data: imagenet-sample-40 (4 full-size-like JPEGs) and
    imagenette-128 (train/ and val/, 128 px)."""
    rng = np.random.default_rng(0)
    for c in ('n01', 'n02', 'n03', 'n04'):
        folder = base / 'imagenet-sample-40' / 'train' / c
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(folder / 'x.JPEG')
        for split in ('train', 'val'):
            folder = base / 'imagenette-128' / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / f'{i}.jpg')
    return base


def measure(out: Path, **env: str):
    return run_cmd(['bash', ROOT / 'ViT' / 'measure_gpu.sh', out], timeout=400, cwd=ROOT,
                   env=warm_nested_runs(subprocess_env(QUICK='1', **env)))


@pytest.mark.long
def test_quick_run_packs_every_stage(tmp_path):
    data = stand_in_data(tmp_path / 'data')
    out = tmp_path / 'out'
    res = measure(out, DATA=str(data), STUDY_MINUTES='0.001')
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    # few files come back from the device: one archive per part and the console log
    assert sorted(p.name for p in out.iterdir()) == ['console.txt', 'measure_gpu.tgz', 'study', 'study_logs.tgz']
    console = (out / 'console.txt').read_text()
    stages = ['1. step', '2. Imagenette', '3. the project step under torch.compile', '4. gpu backend', '5. targets',
              '6. GPU integration tests', '7. study', 'done']
    at = [console.find(f's] {stage}') for stage in stages]  # the stage lines: '== 12:00:00 [+5s] 1. step'
    assert -1 not in at and at == sorted(at), dict(zip(stages, at))
    with tarfile.open(out / 'measure_gpu.tgz') as tar:
        names = {n.lstrip('./') for n in tar.getnames()}
        summary = tar.extractfile('./summary.md').read().decode()
    for name in ('env.txt', 'b16_224/benchmark.json', 'b16_224/benchmark_freeze.png',
                 'b16_224_decode_inline/benchmark.json', 'imagenette_step/benchmark.json',
                 'b16_224_compile/benchmark.json',
                 'imagenette_run/log.txt', 'summary.md', 'gpu_tests.txt'):
        assert name in names, name
    assert not any(n.endswith('.pth') for n in names)  # checkpoints stay behind
    assert '| project step, nothing frozen, vs upstream reference |' in summary
    assert '| project step under --compile, nothing frozen, vs upstream reference |' in summary
    compiled = json.loads(tar_member(out, './b16_224_compile/benchmark.json'))
    assert compiled['compile'] is True and compiled['ks'] == [0, 12]  # QUICK: 2 of the GPU run's 4 graphs
    assert 'real run_pretrain.py epoch' in summary and 'linear t_0=0.5' in summary
    assert 'step fed by each backend' in summary  # pil end to end, measured on CPU too
    assert 'skipped' in console and 'needs a CUDA GPU' in console  # the GPU tests, on CPU
    # the study stage: the first run starts (nothing measured yet to judge by), then the budget
    # (spent at once here) stops it; its JSON, table and plot sit in out/study/, its logs packed
    assert 'study stopped early: fine-tuning regular/seed0 not started' in console
    assert list(json.loads((out / 'study' / 'study_results.json').read_text())['runs']) == ['regular/seed0']
    assert (out / 'study' / 'study_results.md').is_file()
    with tarfile.open(out / 'study_logs.tgz') as tar:
        assert any(n.endswith('study_log.txt') for n in tar.getnames())


@pytest.mark.long
def test_only_study_runs_the_study_stage_alone(tmp_path):
    """ONLY_STUDY=1: no benchmark stage, the study continues the results JSON in out/study/."""
    data = stand_in_data(tmp_path / 'data')
    shutil.rmtree(data / 'imagenet-sample-40')  # the study reads Imagenette only
    out = tmp_path / 'out'
    runs = tmp_path / 'kept_runs'  # on a GPU: study_out/gpu_runs, which a warm machine keeps between calls
    res = measure(out, DATA=str(data), ONLY_STUDY='1', STUDY_MINUTES='0.001', STUDY_RUNS=str(runs))
    assert res.returncode == 0, res.describe()
    console = (out / 'console.txt').read_text()
    assert '7. study' in console and '1. step' not in console and '0. environment' not in console
    assert sorted(p.name for p in out.iterdir()) == ['console.txt', 'study', 'study_logs.tgz']
    record = json.loads((out / 'study' / 'study_results.json').read_text())['runs']['regular/seed0']
    assert Path(record['checkpoint']).is_file() and runs in Path(record['checkpoint']).parents  # still there
    with tarfile.open(out / 'study_logs.tgz') as tar:
        assert 'kept_runs/regular/seed0/study_log.txt' in tar.getnames()
    # STUDY_UNTIL: the study gets the seconds left until then (here, nearly all 35 of them)
    res = measure(tmp_path / 'out_until', DATA=str(data), ONLY_STUDY='1', STUDY_UNTIL='35')
    assert res.returncode == 0, res.describe()
    minutes = float(res.output.split('7. study (at most ')[1].split(' minutes')[0])
    assert 0.5 < minutes <= 0.59  # 35 s, rounded to 0.58 minutes
    assert 'regular/seed0' in json.loads((tmp_path / 'out_until' / 'study' / 'study_results.json').read_text())['runs']
    res = measure(tmp_path / 'out2', DATA=str(data), ONLY_STUDY='1')
    assert res.returncode == 2 and 'ONLY_STUDY=1 needs STUDY_MINUTES=N or STUDY_UNTIL=S' in res.output
    res = measure(tmp_path / 'out3', DATA=str(data), ONLY_STUDY='1', STUDY_UNTIL='5')  # under 30 s left
    assert res.returncode == 2 and 'no time left for the study' in res.output
    assert 'ONLY_STUDY=1 but no time for the study' in res.output


def test_vit_python_starts_its_pythons_and_a_relative_one_is_found_from_the_callers_folder(tmp_path):
    """The script cds into ViT/ first; ./wrap is still the caller's."""
    data = stand_in_data(tmp_path / 'data')
    wrapper = tmp_path / 'wrap'
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path / "calls"}\nexec python3 "$@"\n')
    wrapper.chmod(0o755)
    res = run_cmd(['bash', ROOT / 'ViT' / 'measure_gpu.sh', tmp_path / 'out'], timeout=60, cwd=tmp_path,
                  env=subprocess_env(QUICK='1', DATA=str(data), ONLY_STUDY='1', STUDY_UNTIL='5',
                                     VIT_PYTHON='./wrap'))
    assert res.returncode == 2 and 'no time left for the study' in res.output, res.describe()
    assert (tmp_path / 'calls').read_text() == '-c\n'  # the minutes left, worked out by VIT_PYTHON


def tar_member(out: Path, name: str) -> str:
    with tarfile.open(out / 'measure_gpu.tgz') as tar:
        return tar.extractfile(name).read().decode()


def test_missing_data_and_bad_study_minutes_are_clear_errors(tmp_path):
    res = measure(tmp_path / 'out', DATA=str(tmp_path / 'nowhere'))
    assert res.returncode == 2 and 'error:' in res.output and 'copy the shared data' in res.output
    res = measure(tmp_path / 'out2', DATA=str(stand_in_data(tmp_path / 'data')), STUDY_MINUTES='4min')
    assert res.returncode == 2 and "STUDY_MINUTES must be a number of minutes, got '4min'" in res.output
    for bad in ('9m', '0560'):  # a leading 0 would be octal in bash arithmetic
        res = measure(tmp_path / 'out3', DATA=str(tmp_path / 'data'), STUDY_UNTIL=bad)
        assert res.returncode == 2 and f"STUDY_UNTIL must be whole seconds after the start, got '{bad}'" in res.output
    res = measure(tmp_path / 'out4', DATA=str(tmp_path / 'data'), STUDY_UNTIL='500', STUDY_MINUTES='3')
    assert res.returncode == 2 and 'give STUDY_MINUTES or STUDY_UNTIL, not both' in res.output
    res = measure(tmp_path / 'out5', DATA=str(tmp_path / 'data'), VIT_PYTHON='no-such-python3 -u')
    assert res.returncode == 2, res.describe()
    assert "error: VIT_PYTHON='no-such-python3 -u': no-such-python3 is not a command" in res.output
    assert '== ' not in res.output  # before the first stage


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_check_targets_arithmetic(tmp_path):
    ks = list(range(13))
    write_json(tmp_path / 'b16_224' / 'benchmark.json', {
        'device': 'NVIDIA H100', 'model': 'MIM_vit_base_patch16', 'batch_size': 256, 'input_size': 224,
        'amp': 'bf16', 'date': '2026-11-28', 'reference_step_img_per_s': 1000.0,
        'ks': ks, 'freeze_img_per_s': [1800.0] * 13, 'schedule_average_img_per_s': 2000.0,
        'how_scale': 'cubic', 't_0': 0.8, 'decode_ahead': 2, 'warmup_s': [0.5 + k for k in ks],
        'loader_img_per_s': {'pil': 500.0, 'gpu': 2500.0, 'gpu (cpu decode 0.3)': 2600.0, 'gpu-cache': 9000.0},
        'notes': ['schedule average interpolates k = [3]', 'loader gpu-cache failed: RuntimeError: boom'],
        'end_to_end_img_per_s': {'gpu': {'0': 900.0, '12': 1700.0}}})
    write_json(tmp_path / 'b16_224_decode_inline' / 'benchmark.json', {
        'loader_img_per_s': {'gpu': 1500.0}, 'end_to_end_img_per_s': {'gpu': {'0': 700.0}}})
    write_json(tmp_path / 'imagenette_step' / 'benchmark.json', {'input_size': 128, 'freeze_img_per_s': [4000.0]})
    write_json(tmp_path / 'b16_224_compile' / 'benchmark.json', {
        'ks': [0, 4, 8], 'freeze_img_per_s': [1750.0, 2000.0, 3000.0], 'schedule_average_img_per_s': 2300.0,
        'how_scale': 'cubic', 't_0': 0.8, 'warmup_s': [61.2, 40.4, 38.0],
        'partial': [12]})  # cut short before its last k
    (tmp_path / 'imagenette_run').mkdir()
    (tmp_path / 'imagenette_run' / 'log.txt').write_text(
        json.dumps({'train_images_per_s': 1000.0}) + '\n' + json.dumps({'train_images_per_s': 3800.0}) + '\n')
    md = benchmark.check_targets(tmp_path)
    rows = {line.split(' | ')[0].lstrip('| '): line for line in md.splitlines() if line.startswith('| ')}
    assert '1.80x' in rows['project step, nothing frozen, vs upstream reference'] and '| met |' in md
    assert 'missed by 9%' in rows['FreezeOut schedule average (cubic t_0=0.8) vs upstream reference']  # 2.0 / 2.2
    compiled = rows['project step under --compile, nothing frozen, vs upstream reference']
    assert '1.75x (1,750 vs 1,000 img/s)' in compiled and compiled.endswith('| met |')
    compiled_avg = rows['FreezeOut schedule average under --compile (cubic t_0=0.8; k = 0, 4, 8 measured, the '
                        'others from them; cut short, k = [12] not measured) vs upstream reference']
    assert '2.30x' in compiled_avg and compiled_avg.endswith('| met |')
    assert '- the compiled step was cut short: k = [12] not measured' in md
    assert 'compilation included) per k: k=0 61 s (eager 0.5 s), k=4 40 s (eager 4.5 s), k=8 38 s (eager 8.5 s).' in md
    # gpu-cache is not a JPEG backend; the gpu backend with a CPU decode share is
    gpu = rows['fastest JPEG backend (gpu (cpu decode 0.3), loader alone) vs schedule average']
    assert '130%' in gpu and gpu.endswith('| met |')
    real = rows['real run_pretrain.py epoch (2 of 2) vs synthetic step, 128 px']  # the last epoch counts
    assert '95%' in real and real.endswith('| met |')
    assert '1,800 img/s (1.80x the reference)' in md  # linear 0.5 from constant per-k rates
    assert '| gpu | 0 | 900 | 1,800 | 50% |' in md
    assert '1,500 img/s (vs 2,500 with --decode_ahead 2); end to end k=0: 700 img/s (vs 900)' in md
    assert '- loader gpu-cache failed: RuntimeError: boom' in md and 'interpolates' not in md
    assert '](targets_freeze.png)' in md and (tmp_path / 'targets_freeze.png').stat().st_size > 0
    # missing stages are reported, not a traceback
    assert 'nothing to check' in benchmark.check_targets(tmp_path / 'empty')


def test_check_targets_flags_a_stage_1_cut_short(tmp_path):
    """A partial stage-1 file (ks 0..6 of 13 layers) is flagged, and the linear t_0=0.5 average,
    which needs every k, is not derived from it."""
    write_json(tmp_path / 'b16_224' / 'benchmark.json', {
        'device': 'NVIDIA H100', 'model': 'MIM_vit_base_patch16', 'batch_size': 256, 'input_size': 224,
        'amp': 'bf16', 'date': '2026-11-28', 'reference_step_img_per_s': 1000.0,
        'ks': list(range(7)), 'freeze_img_per_s': [1800.0] * 7, 'schedule_weights': [0.1] * 13,
        'schedule_average_img_per_s': 2000.0, 'how_scale': 'cubic', 't_0': 0.8, 'loader_img_per_s': {},
        'notes': [], 'partial': list(range(7, 13))})
    md = benchmark.check_targets(tmp_path)
    assert '- stage 1 (eager step) was cut short: k = [7, 8, 9, 10, 11, 12] not measured' in md
    assert 'linear t_0=0.5' not in md and '| project step, nothing frozen, vs upstream reference |' in md


def test_a_time_limit_mid_stage_packs_what_was_written(tmp_path):
    """TERM to the script's process group (as a time limit sends) in stage 1, once its benchmark
    has written the first k's figures: the archive, which the stage would only have made at
    its end, holds them, marked partial."""
    data = stand_in_data(tmp_path / 'data')
    work = tmp_path / 'tmp'
    work.mkdir()
    out = tmp_path / 'out'
    proc = subprocess.Popen(['bash', str(ROOT / 'ViT' / 'measure_gpu.sh'), str(out)], cwd=ROOT,
                            env=subprocess_env(QUICK='1', DATA=str(data), TMPDIR=str(work)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(work.glob('measure_gpu.*/b16_224/benchmark.json')):
            assert proc.poll() is None and time.monotonic() < deadline, 'stage 1 never wrote a benchmark.json'
            time.sleep(0.1)
        packed_before = (out / 'measure_gpu.tgz').exists()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not packed_before  # stage 1 was still running: only the signal's pack can have made the archive
    partial = json.loads(tar_member(out, './b16_224/benchmark.json'))
    assert partial['ks'][0] == 0 and partial['partial'] and partial['ks'] + partial['partial'] == list(range(13))
