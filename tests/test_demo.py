"""demo.py, the README's first command (shortened)."""
import sys

from helpers import VIT, run_cmd


def test_demo_runs_plain_and_freezeout(tmp_path):
    stale = tmp_path / 'demo' / 'plain' / 'checkpoint-7.pth'  # an earlier demo's: the rerun starts clean
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b'old')
    res = run_cmd([sys.executable, VIT / 'demo.py', '--epochs', '2', '--out', tmp_path / 'demo'], timeout=300)
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    import json
    import re
    loops = [sum(json.loads(line)['train_epoch_time'] for line in (tmp_path / 'demo' / run / 'log.txt').open())
             for run in ('plain', 'freezeout')]
    said = re.search(r'FreezeOut saved (-?[\d.]+)% of the training loop time and (-?[\d.]+)% of the wall time',
                     res.stdout)
    assert said and float(said[1]) == round(100 * (1 - loops[1] / loops[0]), 1), res.describe()
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
