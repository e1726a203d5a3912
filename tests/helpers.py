"""Shared helpers for the end-to-end tests: they run ViT/run_pretrain.py (or a launcher around it)
as a subprocess with cwd=ViT, on a small real-photo ImageFolder made once per session."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from script_server import WarmInterpreter, startup_env_differs, stop_group

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / 'ViT'

NUM_CLASSES, IMAGES_PER_CLASS, IMAGE_SIZE = 4, 8, 64
NUM_IMAGES = NUM_CLASSES * IMAGES_PER_CLASS
BATCH = 4

COMMON = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', str(BATCH),
          '--device', 'cpu', '--num_workers', '0', '--print_freq', '2', '--warmup_epochs', '1',
          '--blr', '1e-3']

# variables a launcher sets; a stray one in the test environment would turn a plain run distributed
LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK',
                 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID')


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               CUDA_VISIBLE_DEVICES='')  # CPU tests, also on a machine with a GPU
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (f'exit {self.returncode}\n--- stdout (tail) ---\n{self.stdout[-4000:]}\n'
                f'--- stderr (tail) ---\n{self.stderr[-4000:]}')


def run_cmd(cmd: list[str], timeout: float = 180, cwd: Path = VIT, env: dict | None = None) -> Result:
    """Runs cmd in its own process group; on timeout the whole group (launcher and workers) is
    killed and the test fails (a hang is a failure, not a stuck test session). `python script.py
    ...` runs in a child of the warm interpreter (tests/script_server.py) where it can."""
    cmd = [str(c) for c in cmd]
    env = env or subprocess_env()
    if warm_interpreter_fits(cmd, env):
        code, out, err = WARM.run(cmd[1:], timeout, cwd, env)
    else:
        code, out, err = run_fresh(cmd, timeout, cwd, env)
    if code is None:
        import pytest
        pytest.fail(f'timed out after {timeout}s (hang?): {" ".join(cmd)}\n{Result(-9, out, err).describe()}')
    return Result(code, out, err)


def run_fresh(cmd: list[str], timeout: float, cwd: Path, env: dict) -> tuple[int | None, str, str]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    outputs = ['', '']

    def ended(within: float) -> bool:
        try:
            outputs[:] = proc.communicate(timeout=within)
            return True
        except subprocess.TimeoutExpired:
            return False

    if not ended(timeout):
        stop_group(proc.pid, ended)
        return None, *outputs
    return proc.returncode, *outputs


def warm_interpreter_fits(cmd: list[str], env: dict[str, str]) -> bool:
    """`python script.py ...` whose environment differs from the warm interpreter's in nothing
    read at start-up; TESTS_FRESH_INTERPRETERS=1 turns the warm interpreter off."""
    if os.environ.get('TESTS_FRESH_INTERPRETERS') or len(cmd) < 2 or cmd[0] != sys.executable:
        return False
    if not cmd[1].endswith('.py') or not WARM.available():
        return False
    return not startup_env_differs(WARM.env, env)


WARM = WarmInterpreter(subprocess_env())


def warm_nested_runs(env: dict[str, str]) -> dict[str, str]:
    """env, plus the variables that send a tool script's own runs (study.py's, demo.py's,
    measure_gpu.sh's) to the warm interpreter too, where it is on; a VIT_PYTHON in env stays."""
    if os.environ.get('TESTS_FRESH_INTERPRETERS') or 'VIT_PYTHON' in env:
        return env
    return {**env, **WARM.nested_env()}


def run_pretrain(*flags: str, timeout: float = 180, script: str = 'run_pretrain.py',
                 common: bool = True, env: dict | None = None) -> Result:
    cmd = [sys.executable, script, *(COMMON if common else []), *map(str, flags)]
    return run_cmd(cmd, timeout=timeout, env=env)


def run_ok(*flags: str, **kwargs) -> Result:
    res = run_pretrain(*flags, **kwargs)
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    return res


def make_demo_data(base: Path) -> Path:
    """<base>/demo/train/<class>/*.jpg (4 classes x 8 images of 64 px) and .../val; idempotent."""
    from util.demo_data import make_demo_dataset  # in this process: 0.6 s, against 6 s in a fresh one
    root = base / 'demo'
    make_demo_dataset(root, NUM_CLASSES, IMAGES_PER_CLASS, IMAGE_SIZE)
    classes = sorted(p for p in (root / 'train').iterdir() if p.is_dir())
    assert len(classes) == NUM_CLASSES
    assert sum(len(list(c.glob('*.jpg'))) for c in classes) == NUM_IMAGES
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def read_log(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / 'log.txt').read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_schedule(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / 'freezeout_schedule.json').read_text())


def expected_fractions(num_layers: int, t_0: float, how: str) -> list[float]:
    power = {'linear': 1, 'squared': 2, 'cubic': 3}[how]
    return [(t_0 + (1 - t_0) * i / (num_layers - 1)) ** power for i in range(num_layers)]


def ceil_steps(t: float, total: int) -> int:
    return math.ceil(t * total - 1e-9)  # ceil(t * T), immune to float noise at exact integers


def frozen_at(schedule: dict, step: int) -> int:
    """Layers frozen while optimizer step `step` runs."""
    return sum(1 for row in schedule['layers'] if row['freeze_step'] <= step)


def keys_of_prefixes(state: dict, prefixes: list[str]) -> list[str]:
    return [k for k in state if any(k == p or k.startswith(p + '.') for p in prefixes)]


def args_line(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith('args: '):
            return json.loads(line[len('args: '):])
    raise AssertionError('no "args: " line in the output')


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f'{what}: different keys {set(a) ^ set(b)}'
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f'{what}: {len(diff)} tensors differ, e.g. {diff[:5]}'


def grad_layout_mismatches(model: torch.nn.Module) -> list[str]:
    """Parameters whose gradient has other strides than the parameter: DDP copies those instead of
    all-reducing in place and warns 'Grad strides do not match bucket view strides'."""
    return [f'{name} {tuple(p.shape)}: param strides {p.stride()}, grad strides {p.grad.stride()}'
            for name, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]


# DDP's warning for the case above, which a distributed run's output must not contain
DDP_STRIDE_WARNING = 'Grad strides do not match bucket view strides'


def assert_same_optimizer_state(a: dict, b: dict, what: str) -> None:
    """Optimizer state_dicts: same per-parameter entries, tensors bitwise equal."""
    assert a['state'].keys() == b['state'].keys(), f'{what}: state of different parameters'
    for idx in a['state']:
        sa, sb = a['state'][idx], b['state'][idx]
        assert sa.keys() == sb.keys()
        for k in sa:
            va, vb = sa[k], sb[k]
            same = torch.equal(va, vb) if torch.is_tensor(va) else va == vb
            assert same, f'{what}: optimizer state {idx}/{k} differs'
    assert [g['lr'] for g in a['param_groups']] == [g['lr'] for g in b['param_groups']]


def run_script(args: list, timeout: float = 240) -> Result:
    """A ViT/ script with this Python, from ViT/, in the CPU test environment."""
    return run_cmd([sys.executable, *args], timeout=timeout)
