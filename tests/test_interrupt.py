"""Ctrl-C at any moment ends an entry script with one line and status 130, never a traceback:
while torch imports (util.startup), and in the tool scripts (util.startup.run_tool; the study
says where its recorded runs are). The training scripts' later Ctrl-C is tested in
test_pretrain_e2e."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import VIT, make_demo_data, subprocess_env

# on PYTHONPATH in the child: `import torch` first touches a marker file, then sleeps, so the
# Ctrl-C below lands inside the imports whatever the machine's speed
SLOW_TORCH_IMPORT = '''
import os, sys, time


class SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch':
            open(os.environ['IMPORTING_TORCH'], 'w').close()
            time.sleep(float(os.environ.get('SLOW_TORCH_SECONDS', '60')))
        return None


sys.meta_path.insert(0, SlowTorch())
'''


def start(cmd: list[str], env: dict, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=VIT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec_fn)


def ctrl_c(proc: subprocess.Popen) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole foreground group
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('still running 60 s after Ctrl-C:\n' + '\n'.join(proc.communicate()))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f'{path} did not appear (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}')
        time.sleep(0.1)


@pytest.mark.parametrize('script', ['run_pretrain.py', 'run_knn.py', 'study.py', 'estimate_speedup.py'])
def test_ctrl_c_while_torch_imports_is_one_line(tmp_path, script):
    """(A real command: --help no longer imports torch.) The study imports it after parsing, under
    run_tool's handler; the others before, under util.startup's."""
    (tmp_path / 'sitecustomize.py').write_text(SLOW_TORCH_IMPORT)
    marker = tmp_path / 'importing_torch'
    env = subprocess_env(PYTHONPATH=str(tmp_path), IMPORTING_TORCH=str(marker))
    out = tmp_path / 'out'  # nothing is written there: the Ctrl-C comes first
    flags = {'run_pretrain.py': ['--output_dir', out], 'run_knn.py': ['--output_dir', out],
             'study.py': ['--out', out, '--results', out / 'results.json'], 'estimate_speedup.py': ['--t_0', '0.8']}
    proc = start([script, '--device', 'cpu', '--data_path', tmp_path / 'data', *flags[script]], env)
    wait_for(marker, proc)
    out, err = ctrl_c(proc)
    assert proc.returncode == 130, (out, err)
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
    assert err.strip() == 'interrupted', err


def test_a_script_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """As `cmd &` in a non-interactive shell starts it: SIGINT ignored, inherited, kept."""
    (tmp_path / 'sitecustomize.py').write_text(SLOW_TORCH_IMPORT)
    marker = tmp_path / 'importing_torch'
    env = subprocess_env(PYTHONPATH=str(tmp_path), IMPORTING_TORCH=str(marker), SLOW_TORCH_SECONDS='2')
    proc = start(['estimate_speedup.py', '--model', 'MIM_vit_tiny_patch16', '--t_0', '0.8'], env,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(marker, proc)
    out, err = ctrl_c(proc)
    assert proc.returncode == 0 and 'speedup' in out and 'interrupted' not in err, (out, err)


def test_a_test_importing_a_script_keeps_its_own_ctrl_c_handler():
    """util.startup acts only when the process was started as one of the scripts."""
    import run_pretrain  # noqa: F401 - imports util.startup
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize('rerun', [[], ['--rerun']])
def test_ctrl_c_during_the_study_says_where_its_recorded_runs_are(tmp_path, rerun):
    """With --rerun, the same command would redo the recorded runs too: the line says to drop it."""
    data = make_demo_data(tmp_path)
    out = tmp_path / 'study'
    proc = start(['study.py', '--quick', '--device', 'cpu', '--data_path', data, '--out', out, *rerun],
                 subprocess_env())
    wait_for(out / 'regular' / 'seed0' / 'pretrain' / 'log.txt', proc)  # inside the first pretraining
    stdout, stderr = ctrl_c(proc)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f'interrupted: the runs recorded so far are in {out / "study_results.json"}; the same command'
        f'{" without --rerun" if rerun else ""} continues with the others (the run cut short starts again from '
        'scratch)'), stderr[-3000:]


def test_ctrl_c_in_a_tool_script_is_one_line(tmp_path):
    """demo.py, interrupted inside its first pretraining run (whose own line comes first)."""
    out = tmp_path / 'demo'
    proc = start(['demo.py', '--out', out, '--epochs', '50'], subprocess_env())
    wait_for(out / 'plain' / 'log.txt', proc)
    stdout, stderr = ctrl_c(proc)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == 'interrupted', stderr[-3000:]


def test_a_suite_started_with_ctrl_c_ignored_gives_its_runs_the_default(tmp_path):
    """tests/conftest.py: pytest started in a script's background (`pytest ... &`, Ctrl-C ignored)
    still runs the Ctrl-C tests against the product's own handling."""
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p', 'no:cacheprovider',
                           str(VIT.parent / 'tests' / 'test_interrupt.py'), '-k', 'keeps_its_own_ctrl_c_handler'],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and '1 passed' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
