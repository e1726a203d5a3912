"""study.py --quick: every step of the small-scale study (pretraining under each config, kNN,
linear probe, the best config's decoder ablation and second seed, fine-tuning), at toy size
on CPU; results JSON, table and plot written, and a second invocation extends, not redoes."""
import json
import sys

from helpers import make_demo_data, run_cmd, subprocess_env


def test_quick_study_end_to_end(tmp_path):
    data = make_demo_data(tmp_path)
    results = tmp_path / 'results' / 'study_results.json'
    cmd = [sys.executable, 'study.py', '--quick', '--device', 'cpu', '--data_path', str(data),
           '--out', str(tmp_path / 'runs'), '--results', str(results)]
    r = run_cmd(cmd, timeout=600, env=subprocess_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = json.loads(results.read_text())['runs']
    configs = {key.split('/')[0] for key in runs}
    assert {'regular', 'cubic0.8', 'linear0.5-noscale'} <= configs
    best = [c for c in configs if c.endswith('-never')]
    assert len(best) == 1  # the decoder ablation of the best FreezeOut config
    best = best[0][:-len('-never')]
    assert 'regular/seed1' in runs and f'{best}/seed1' in runs  # second seed for regular and best
    for record in runs.values():
        assert 0 <= record['knn_top1'] <= 100 and 0 <= record['linprobe_top1'] <= 100
        assert record['linprobe_protocol'].startswith('frozen features')
        assert record['pretrain_train_s'] > 0 and record['device'] == 'cpu'
    assert runs['regular/seed0']['flops_saving_estimate'] == 0
    assert runs[f'{best}/seed0']['flops_saving_estimate'] > 0.05
    assert 'finetune_top1' in runs['regular/seed0'] and 'finetune_top1' in runs[f'{best}/seed0']
    table = (results.parent / 'study_results.md').read_text()
    assert table.count('\n') == len(runs) + 2 and '| regular | 0 |' in table
    assert (results.parent / 'study_accuracy_vs_time.png').stat().st_size > 1000

    # a second invocation skips what is recorded
    r2 = run_cmd(cmd, timeout=300, env=subprocess_env())
    assert r2.returncode == 0
    assert r2.stdout.count('skipped') == len(runs) and 'run_pretrain.py' not in r2.stdout


def test_missing_data_is_a_clear_error(tmp_path):
    r = run_cmd([sys.executable, 'study.py', '--quick', '--device', 'cpu', '--data_path', str(tmp_path / 'nope'),
                 '--results', str(tmp_path / 'r.json')], env=subprocess_env())
    assert r.returncode != 0 and 'error' in r.stderr and 'Traceback' not in r.stderr
