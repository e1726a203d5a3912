"""demo.py, the README's first command (shortened)."""
import sys

import pytest

from helpers import VIT, run_cmd, subprocess_env, warm_nested_runs


@pytest.mark.long
def test_demo_runs_plain_and_freezeout(tmp_path):
    stale = tmp_path / 'demo' / 'plain' / 'checkpoint-7.pth'  # an earlier demo's: the rerun starts clean
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b'old')
    res = run_cmd([sys.executable, VIT / 'demo.py', '--epochs', '2', '--out', tmp_path / 'demo'], timeout=300,
                  env=warm_nested_runs(subprocess_env()))
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    import json
    import re
    loops = [sum(json.loads(line)['train_epoch_time'] for line in (tmp_path / 'demo' / run / 'log.txt').open())
             for run in ('plain', 'freezeout')]
    said = re.search(r'FreezeOut took ([\d.]+)% (less|more) training-loop time and ([\d.]+)% (less|more) wall time',
                     res.stdout)
    assert said, res.describe()
    assert float(said[1]) * (1 if said[2] == 'less' else -1) == round(100 * (1 - loops[1] / loops[0]), 1)
    assert re.search(r'^plain +[\d.]+s +[\d.]+s +0\.\d{4}  ', res.stdout, re.M), res.describe()
    for run in ('plain', 'freezeout'):
        assert (tmp_path / 'demo' / run / 'checkpoint-1.pth').is_file(), run
    assert not stale.exists() and not list((tmp_path / 'demo' / 'plain').glob('previous-*'))
    assert f'(replacing the previous demo run in {tmp_path / "demo" / "plain"})' in res.stdout


def test_demo_with_too_few_epochs_is_a_clear_error(tmp_path):
    res = run_cmd([sys.executable, VIT / 'demo.py', '--epochs', '1', '--out', tmp_path / 'demo'], timeout=120)
    assert res.returncode != 0 and 'error: --epochs must be at least 2' in res.stderr, res.describe()
    assert 'Traceback' not in res.output and not (tmp_path / 'demo' / 'plain').exists()


def test_demo_out_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / 'a_file').write_text('')
    res = run_cmd([sys.executable, VIT / 'demo.py', '--out', tmp_path / 'a_file' / 'demo'], timeout=120)
    assert res.returncode != 0 and f'error: cannot create --out {tmp_path / "a_file" / "demo"}' in res.stderr, \
        res.describe()
    assert 'Traceback' not in res.output


def test_demo_with_a_vit_python_that_cannot_start_is_a_clear_error(tmp_path):
    res = run_cmd([sys.executable, VIT / 'demo.py', '--out', tmp_path / 'demo'], timeout=120,
                  env=subprocess_env(VIT_PYTHON='no-such-python3'))
    assert res.returncode != 0 and "error: VIT_PYTHON='no-such-python3': no-such-python3 is not a command" in res.stderr
    assert 'Traceback' not in res.output and not (tmp_path / 'demo').exists(), res.describe()


def test_summary_words_a_slower_freezeout_run_and_a_busy_machine():
    """A negative saving reads as "more", not "saved -41%"; epochs that froze nothing at very
    different paces (the machine was busy) get a note; the loss shown is the scale both runs train."""
    from pathlib import Path

    import demo

    def log(rates, frozen, loss):
        return [{'train_epoch_time': 100 / r, 'train_images_per_s': r, 'train_frozen_layers': f,
                 'train_loss_scale0.5': loss, 'train_loss': 9.0} for r, f in zip(rates, frozen)]
    quiet = demo.summary(log([50, 100, 100, 100], [0] * 4, 0.25), log([50, 100, 110, 140], [0, 0, 2, 6], 0.5),
                         20.0, 18.0, Path('/o'))
    assert quiet[1].split()[-2:] == ['0.2500', '/o/plain'] and quiet[2].split()[-2:] == ['0.5000', '/o/freezeout']
    assert quiet[3].startswith('FreezeOut took 7.5% less training-loop time and 10.0% less wall time')
    assert len(quiet) == 4  # no note: the unfrozen epochs ran at one pace
    busy = demo.summary(log([50, 100, 20, 100], [0] * 4, 0.25), log([50, 10, 110, 140], [0, 0, 2, 6], 0.5),
                        20.0, 30.0, Path('/o'))
    assert busy[3].startswith('FreezeOut took 51.4% more training-loop time and 50.0% more wall time')
    assert busy[4].startswith('note: the epochs that froze nothing ran at 10 to 100 img/s: the machine was busy')
