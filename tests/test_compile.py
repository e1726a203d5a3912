"""--compile survives FreezeOut's freeze events with at most one recompile per event
(dynamo's 'eager' backend keeps this test fast; inductor adds code generation, not graphs)."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_compile_recompiles_once_per_freeze_event(tmp_path):
    from util.demo_data import make_demo_dataset
    data = make_demo_dataset(tmp_path / 'data', num_classes=2, images_per_class=8, size=32)
    cmd = [sys.executable, 'run_pretrain.py', '--model', 'MIM_vit_tiny_patch16', '--input_size', '32',
           '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '0', '--data_path', str(data),
           '--output_dir', str(tmp_path / 'out'), '--device', 'cpu', '--num_workers', '0',
           '--t_0', '0.5', '--how_scale', 'linear', '--compile', '--compile_backend', 'eager',
           '--print_freq', '100']
    env = {**os.environ, 'TORCH_LOGS': 'recompiles', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, cwd=ROOT / 'ViT', env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    events = len(re.findall(r'^FreezeOut: step \d+', proc.stdout, flags=re.M))
    recompiles = len(re.findall(r'Recompiling function forward', out))
    assert events >= 3  # several freeze events happened inside the run
    assert recompiles <= events


def test_allow_recompiles_sets_the_limit_this_torch_has():
    """`recompile_limit` on current torch, `cache_size_limit` before it was renamed; never lowered."""
    from types import SimpleNamespace
    from util.runtime import allow_recompiles
    current, older = SimpleNamespace(recompile_limit=8), SimpleNamespace(cache_size_limit=8)
    allow_recompiles(34, current)
    allow_recompiles(34, older)
    assert current.recompile_limit == 34 and not hasattr(current, 'cache_size_limit')
    assert older.cache_size_limit == 34
    allow_recompiles(10, current)
    assert current.recompile_limit == 34
