"""study.py --quick: every step of the small-scale study (pretraining under each config, kNN,
linear probe, the best config's decoder ablation and second seed, fine-tuning), at toy size
on CPU; results JSON, table and plot written, and a second invocation extends, not redoes."""
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from helpers import VIT, make_demo_data, run_cmd, subprocess_env, warm_nested_runs


@pytest.mark.long
def test_quick_study_end_to_end(tmp_path):
    data = make_demo_data(tmp_path)
    results = tmp_path / 'results' / 'study_results.json'
    # paths relative to the caller's folder, not ViT/ where the runs' scripts start
    cmd = [sys.executable, VIT / 'study.py', '--quick', '--device', 'cpu', '--data_path', 'demo',
           '--out', 'runs', '--results', 'results/study_results.json']
    env = warm_nested_runs(subprocess_env())  # the study's 26 runs in the warm interpreter too
    r = run_cmd(cmd, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.rstrip().splitlines()[-1] == (
        f'results: {results}, with its table study_results.md and plot study_accuracy_vs_time.png beside it; '
        f'runs\' logs and checkpoints in {tmp_path / "runs"}')
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
        assert 0 <= record['pretrain_data_wait_s'] < record['pretrain_train_s']
    per_epoch = len(list((data / 'train').rglob('*.*'))) // 8 * 8  # --quick: batch 8, 2 epochs
    for record in runs.values():  # images / loop time over the run, not a mean of epoch rates
        assert record['pretrain_img_per_s'] * record['pretrain_train_s'] == pytest.approx(2 * per_epoch, rel=1e-6)
    assert runs['regular/seed0']['flops_saving_estimate'] == 0
    # train_loss sums the live taps; the per-scale terms are what compares across configs
    assert set(runs['regular/seed0']['final_loss_by_scale']) == {'4', '2', '1', '0.5'}
    assert set(runs[f'{best}-never/seed0']['final_loss_by_scale']) == {'4', '2', '1', '0.5'}
    regular = runs['regular/seed0']
    assert regular['final_loss'] == pytest.approx(sum(regular['final_loss_by_scale'].values()))
    assert runs[f'{best}/seed0']['flops_saving_estimate'] > 0.05
    assert 'finetune_top1' in runs['regular/seed0'] and 'finetune_top1' in runs[f'{best}/seed0']
    assert re.search(r'^regular/seed0: fine-tune [\d.]+% top-1 \(1 epoch, \d+s\)$', r.stdout, re.M), r.stdout
    for tuned in (runs['regular/seed0'], runs[f'{best}/seed0']):  # loops and input wait inside the wall time
        assert 0 <= tuned['finetune_data_wait_s'] < tuned['finetune_train_s'] < tuned['finetune_wall_s']
    table = (results.parent / 'study_results.md').read_text()
    assert table.count('\n') == len(runs) + 4 and '| regular | 0 |' in table and '\nTime saved: against' in table
    assert (results.parent / 'study_accuracy_vs_time.png').stat().st_size > 1000

    # a second invocation skips what is recorded; a fine-tune whose checkpoint is gone (recorded
    # on another machine) pretrains that config again first
    recorded = json.loads(results.read_text())
    del recorded['runs']['regular/seed0']['finetune_top1']
    results.write_text(json.dumps(recorded))
    Path(runs['regular/seed0']['checkpoint']).unlink()
    r2 = run_cmd(cmd, timeout=300, env=env, cwd=tmp_path)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert 'is gone; pretraining it again' in r2.stdout
    assert r2.stdout.count('run_pretrain.py') == 1 and r2.stdout.count('run_finetune.py') == 1
    assert r2.stdout.count('skipped') == len(runs)  # regular/seed0 too, before its fine-tune needs it
    again = json.loads(results.read_text())['runs']
    assert 'finetune_top1' in again['regular/seed0'] and Path(again['regular/seed0']['checkpoint']).is_file()
    assert again[f'{best}/seed0'] == runs[f'{best}/seed0']
    # the scored record keeps its times and accuracies; the new encoder's log.txt is a fresh one
    for k in ('pretrain_train_s', 'pretrain_wall_s', 'knn_top1', 'linprobe_top1', 'date'):
        assert again['regular/seed0'][k] == runs['regular/seed0'][k], k
    assert again['regular/seed0']['finetuned_encoder'].startswith('pretrained again')
    log = Path(again['regular/seed0']['checkpoint']).parent / 'log.txt'
    assert [json.loads(line)['epoch'] for line in log.read_text().splitlines()] == [0, 1]
    assert json.loads(results.read_text())['best'] == best


def test_time_budget_stops_before_a_run_that_would_not_finish(tmp_path):
    import argparse

    import study
    s = study.Study.__new__(study.Study)
    s.args = argparse.Namespace(max_minutes=1.0)
    s.start, s.longest_run = time.perf_counter() - 30, 20.0
    s.check_time('next')  # 30 s spent + 20 s for the next run < 60 s
    s.longest_run = 31.0
    with pytest.raises(study.OutOfTime, match='next not started'):
        s.check_time('next')
    s.args.max_minutes = None
    s.check_time('next')  # no budget: never stops

    # the estimate starts from the runs recorded on this card (pretraining + evaluation as one)
    results = tmp_path / 'recorded.json'
    args = study.get_args_parser().parse_args(['--quick', '--results', str(results), '--out', str(tmp_path)])
    study.apply_quick(args, study.get_args_parser().parse_args([]))
    args.device = 'cpu'
    setup = {k: getattr(args, k) for k in study.SETUP_KEYS}
    results.write_text(json.dumps({'runs': {
        'regular/seed0': {**setup, 'device': 'cpu', 'pretrain_wall_s': 50.0, 'eval_wall_s': 20.0,
                          'finetune_wall_s': 60.0},
        'cubic0.8/seed0': {**setup, 'device': 'NVIDIA H100 80GB HBM3', 'pretrain_wall_s': 500.0}}}))
    assert study.Study(args).longest_run == 70.0
    # runs of another setup are refused, not mixed into the table
    args.epochs += 1
    with pytest.raises(SystemExit, match='holds .* of another setup .*epochs'):
        study.Study(args)
    args.epochs -= 1
    args.finetune_batch_size *= 2  # fine-tunes of another batch would not be comparable either
    with pytest.raises(SystemExit, match='holds .* of another setup .*finetune_batch_size 8 there, 16 here'):
        study.Study(args)
    # recorded before --finetune_batch_size existed: its fine-tunes took min(batch, 128)
    legacy = {k: v for k, v in setup.items() if k != 'finetune_batch_size'}
    results.write_text(json.dumps({'runs': {'regular/seed0': {**legacy, 'device': 'cpu'}}}))
    with pytest.raises(SystemExit, match='finetune_batch_size 8 there, 16 here'):
        study.Study(args)
    args.finetune_batch_size = 8
    study.Study(args)

    # on the command line: stops cleanly (exit 0, a message), nothing run, the same command continues later
    data = make_demo_data(tmp_path)
    r = run_cmd([sys.executable, 'study.py', '--quick', '--device', 'cpu', '--data_path', str(data), '--out',
                 str(tmp_path / 'runs'), '--results', str(tmp_path / 'r.json'), '--max_minutes', '0'],
                env=subprocess_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'study stopped early: pretraining regular/seed0 not started' in r.stdout
    assert 'the same command continues' in r.stdout and 'Traceback' not in r.stderr


def test_missing_data_is_a_clear_error(tmp_path):
    r = run_cmd([sys.executable, 'study.py', '--quick', '--device', 'cpu', '--data_path', str(tmp_path / 'nope'),
                 '--results', str(tmp_path / 'r.json')], env=subprocess_env())
    assert r.returncode != 0 and 'error' in r.stderr and 'Traceback' not in r.stderr


def test_a_vit_python_that_cannot_start_is_an_error_before_the_first_run(tmp_path):
    data = make_demo_data(tmp_path)
    r = run_cmd([sys.executable, 'study.py', '--quick', '--device', 'cpu', '--data_path', str(data),
                 '--out', str(tmp_path / 'runs'), '--results', str(tmp_path / 'r.json')],
                env=subprocess_env(VIT_PYTHON='no-such-python3 -u'))
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: VIT_PYTHON='no-such-python3 -u': no-such-python3 is not a command that can be started; unset "
        f"VIT_PYTHON to run the scripts with {sys.executable}"], r.describe()
    assert not (tmp_path / 'runs' / 'regular').exists() and '$ ' not in r.stdout


def no_run(cmd, log):
    raise AssertionError(f'{cmd[0]} was started before the study checked its paths and data')


def test_where_runs_and_results_go_is_checked_before_the_first_run(tmp_path, monkeypatch, demo_data):
    """--out and --results' folder at start-up: an --out that is a file (NotADirectoryError before),
    a --results under a file or that is a folder, and a folder that refuses files (a read-only mount,
    which failed only when the first run was saved; simulated, since root writes through chmod)."""
    import errno

    import study
    import util.cli
    monkeypatch.setattr(study, 'run', no_run)
    afile = tmp_path / 'afile'
    afile.write_text('')
    quick = ['--quick', '--device', 'cpu', '--data_path', str(demo_data)]
    for flags, message in (
            (['--out', str(afile)], f'cannot create --out {afile}: {afile} is a file, not a folder'),
            (['--out', str(tmp_path / 'runs'), '--results', str(afile / 'r.json')],
             f'cannot create the folder of --results {afile}/r.json: {afile} is a file, not a folder'),
            (['--out', str(tmp_path / 'runs'), '--results', str(tmp_path)],
             f'--results {tmp_path} is a folder; give the JSON file, e.g. {tmp_path}/study_results.json')):
        with pytest.raises(SystemExit) as stop:
            study.main([*quick, *flags])
        assert str(stop.value) == f'error: {message}'

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system')
    monkeypatch.setattr(util.cli.tempfile, 'TemporaryFile', read_only)
    with pytest.raises(SystemExit, match=f'^error: cannot write into --out {tmp_path}/runs: Read-only file system$'):
        study.main([*quick, '--out', str(tmp_path / 'runs')])


def test_data_that_every_scoring_run_would_refuse_stops_the_study_before_the_first_run(tmp_path, monkeypatch,
                                                                                         demo_data):
    """A val class that train lacks: the scoring scripts' own check, at start (before, every
    pretraining ran and then every kNN failed). An empty class folder: one error: prefix, not two."""
    import study
    monkeypatch.setattr(study, 'run', no_run)
    data = tmp_path / 'data'
    shutil.copytree(demo_data, data)
    shutil.copytree(next((data / 'val').iterdir()), data / 'val' / 'zebra')
    argv = ['--quick', '--device', 'cpu', '--data_path', str(data), '--out', str(tmp_path / 'runs')]
    with pytest.raises(SystemExit) as stop:
        study.main(argv)
    assert str(stop.value) == f'error: {data}/val has classes that {data}/train lacks: zebra'
    shutil.rmtree(data / 'val' / 'zebra')
    (data / 'train' / 'empty').mkdir()
    with pytest.raises(SystemExit) as stop:
        study.main(argv)
    assert str(stop.value).startswith(f'error: {data}/train: no images in the class folder empty (images: ')


def test_an_image_that_cannot_be_decoded_stops_the_study_at_once(tmp_path, monkeypatch, demo_data):
    """Every run reads the same data: the first run's `error: cannot decode` line stops the study,
    naming the file, instead of failing every config in turn."""
    import study
    real_run, started = study.run, []
    failing = ['-c', 'import sys; print("error: cannot decode /data/train/a/1.jpg: truncated; replace or remove that '
               'file; the same command resumes from x.pth", file=sys.stderr); sys.exit(1)']  # run_main's line and status

    def decode_error(cmd, log):
        started.append(cmd[0])
        return real_run(failing, log)
    monkeypatch.setattr(study, 'run', decode_error)
    with pytest.raises(SystemExit) as stop:
        study.main(['--quick', '--device', 'cpu', '--data_path', str(demo_data), '--out', str(tmp_path / 'runs')])
    assert started == ['run_pretrain.py']
    message = str(stop.value)
    assert message.startswith('error: cannot decode /data/train/a/1.jpg: truncated (stopped -c; its log: ')
    assert 'every run of the study reads that file, so the study stopped' in message
    # only the failed run's own output counts: the same line left in the log by an earlier attempt does not
    log = tmp_path / 'study_log.txt'
    log.write_text('error: cannot decode /data/train/a/1.jpg: truncated\n')
    with pytest.raises(study.RunFailed):
        real_run(['-c', 'import sys; sys.exit("error: injected")'], log)


def test_time_saved_is_against_regular_on_the_same_card(tmp_path):
    import study

    def run(config, seed, card, seconds):
        return {'config': config, 'seed': seed, 'device': card, 'pretrain_train_s': seconds, 'date': '2026-11-28',
                'flops_saving_estimate': 0.2 if config != 'regular' else 0.0, 'pretrain_img_per_s': 1000.0,
                'knn_top1': 50.0, 'linprobe_top1': 60.0, 'model': 'MIM_vit_small_patch16', 'epochs': 40}
    study.render({'runs': {'regular/seed0': run('regular', 0, 'H100', 100.0), 'cubic0.8/seed0': run('cubic0.8', 0, 'H100', 80.0),
                           'regular/seed1': run('regular', 1, 'H200', 50.0), 'cubic0.8/seed1': run('cubic0.8', 1, 'H200', 45.0),
                           'linear0.5/seed0': run('linear0.5', 0, 'A100', 70.0)}}, tmp_path)
    rows = {tuple(c.strip() for c in line.split('|')[1:3]): line
            for line in (tmp_path / 'study_results.md').read_text().splitlines()[2:]}
    assert '| 20.0% |' in rows[('cubic0.8', '0')] and '| 10.0% |' in rows[('cubic0.8', '1')]
    assert '| n/a |' in rows[('linear0.5', '0')]  # no regular run on that card

    # with hosts recorded, the regular runs of the same host (the launch-bound step depends on its CPU)
    hosts = {'regular/seed0': ('regular', 0, 100.0, 'a'), 'regular/seed1': ('regular', 1, 60.0, 'b'),
             'cubic0.8/seed0': ('cubic0.8', 0, 80.0, 'a'), 'cubic0.8/seed1': ('cubic0.8', 1, 45.0, 'b'),
             'linear0.5/seed0': ('linear0.5', 0, 64.0, None)}  # no host: every regular run on the card
    study.render({'runs': {key: {**run(c, seed, 'H200', t), 'host': h} for key, (c, seed, t, h) in hosts.items()}},
                 tmp_path)
    rows = {tuple(c.strip() for c in line.split('|')[1:3]): line
            for line in (tmp_path / 'study_results.md').read_text().splitlines()[2:7]}
    assert '| 20.0% |' in rows[('cubic0.8', '0')] and '| 25.0% |' in rows[('cubic0.8', '1')]
    assert '| 20.0% |' in rows[('linear0.5', '0')]  # against (100 + 60) / 2


def test_a_run_whose_logs_cannot_be_read_fails_alone(tmp_path, monkeypatch):
    """A script that exits 0 but leaves an empty log.txt (a full disk, say) fails that run; the
    study goes on with the others, as after a script error."""
    import study
    data = make_demo_data(tmp_path)
    fake = fake_scripts(lambda cmd: False)

    def empty_knn_log_for_cubic(cmd, log):
        wall = fake(cmd, log)
        if cmd[0] == 'run_knn.py' and 'cubic0.8' in str(cmd):
            (Path(str(cmd[cmd.index('--output_dir') + 1])) / 'log.txt').write_text('')
        return wall
    monkeypatch.setattr(study, 'run', empty_knn_log_for_cubic)
    with pytest.raises(SystemExit) as failed:
        study.main(['--quick', '--device', 'cpu', '--data_path', str(data), '--out', str(tmp_path / 'runs'),
                    '--results', str(tmp_path / 'r.json')])
    assert 'pretraining or scoring cubic0.8/seed0: its log ' in str(failed.value)
    assert 'knn/log.txt could not be read (KeyError' in str(failed.value)
    recorded = json.loads((tmp_path / 'r.json').read_text())
    assert recorded['best'] == 'linear0.5-noscale' and 'regular/seed1' in recorded['runs']


def test_quick_mode_writes_beside_its_runs_not_into_image(tmp_path, monkeypatch):
    import study
    data = make_demo_data(tmp_path)
    monkeypatch.setattr(study, 'ROOT', tmp_path / 'checkout')
    study.main(['--quick', '--device', 'cpu', '--data_path', str(data), '--max_minutes', '0'])
    written = tmp_path / 'checkout' / 'study_out' / 'quick' / 'study_results.json'
    assert json.loads(written.read_text()) == {'runs': {}}  # nothing fitted in 0 minutes; saved atomically
    assert not (tmp_path / 'checkout' / 'image').exists() and not list(written.parent.glob('*.tmp'))


def fake_scripts(fail_when):
    """Stands in for study.run: writes what run_pretrain / run_knn / run_finetune would leave in
    --output_dir (log.txt lines, the final checkpoint), or raises RunFailed when fail_when(cmd)."""
    import study

    def run(cmd, log):
        cmd = [str(c) for c in cmd]
        if fail_when(cmd):
            raise study.RunFailed(f'{cmd[0]} failed (exit 1); last lines of {log}:\nerror: injected')
        out = Path(cmd[cmd.index('--output_dir') + 1])
        out.mkdir(parents=True, exist_ok=True)
        if cmd[0] == 'run_pretrain.py':
            epochs = int(cmd[cmd.index('--epochs') + 1])
            lines = [{'epoch': e, 'train_epoch_time': 1.0, 'train_images_per_s': 8.0, 'train_loss': 1.0,
                      'train_data_wait_s': 0.1}
                     for e in range(epochs)]
            (out / f'checkpoint-{epochs - 1}.pth').write_bytes(b'weights')
        elif cmd[0] == 'run_knn.py':
            lines = [{'mode': 'knn', 'acc1': 40.0}, {'mode': 'linear', 'acc1': 50.0}]
        else:
            lines = [{'epoch': 0, 'max_accuracy': 60.0, 'train_epoch_time': 1.0, 'train_data_wait_s': 0.1}]
        (out / 'log.txt').write_text(''.join(json.dumps(line) + '\n' for line in lines))
        return 1.0
    return run


def test_a_failing_run_is_reported_and_the_study_goes_on(tmp_path, monkeypatch):
    import study
    data = make_demo_data(tmp_path)
    argv = ['--quick', '--device', 'cpu', '--data_path', str(data), '--out', str(tmp_path / 'runs'),
            '--results', str(tmp_path / 'r.json')]
    # linear0.5-noscale's pretraining and regular's fine-tune fail; everything else goes on
    monkeypatch.setattr(study, 'run', fake_scripts(lambda cmd: cmd[0] == 'run_finetune.py' and 'regular' in str(cmd)
                                                   or cmd[0] == 'run_pretrain.py' and 'linear' in cmd))
    with pytest.raises(SystemExit) as failed:
        study.main(argv)
    message = str(failed.value)
    assert message.startswith('error: 2 run(s) of the study failed') and message.count('error: injected') == 2
    assert 'pretraining or scoring linear0.5-noscale/seed0' in message and 'fine-tuning regular/seed0' in message
    recorded = json.loads((tmp_path / 'r.json').read_text())
    assert set(recorded['runs']) == {'regular/seed0', 'cubic0.8/seed0', 'cubic0.8-never/seed0', 'regular/seed1',
                                     'cubic0.8/seed1'}
    assert recorded['best'] == 'cubic0.8'  # chosen among the configs that finished
    assert 'finetune_top1' not in recorded['runs']['regular/seed0']
    assert recorded['runs']['cubic0.8/seed0']['finetune_top1'] == 60.0

    # the same command again tries only what failed, and ends cleanly
    calls = []
    fake = fake_scripts(lambda cmd: False)
    monkeypatch.setattr(study, 'run', lambda cmd, log: calls.append(cmd[0]) or fake(cmd, log))
    again = study.main(argv)
    assert calls == ['run_finetune.py', 'run_pretrain.py', 'run_knn.py']
    assert 'finetune_top1' in again['runs']['regular/seed0'] and 'linear0.5-noscale/seed0' in again['runs']
    assert again['best'] == 'cubic0.8'

    # a fine-tune that must pretrain again (checkpoint gone) and then fails leaves no note of a new encoder
    recorded = json.loads((tmp_path / 'r.json').read_text())
    del recorded['runs']['regular/seed0']['finetune_top1']
    Path(recorded['runs']['regular/seed0']['checkpoint']).unlink()
    (tmp_path / 'r.json').write_text(json.dumps(recorded))
    monkeypatch.setattr(study, 'run', fake_scripts(lambda cmd: cmd[0] == 'run_finetune.py'))
    with pytest.raises(SystemExit, match='fine-tuning regular/seed0'):
        study.main(argv)
    assert 'finetuned_encoder' not in json.loads((tmp_path / 'r.json').read_text())['runs']['regular/seed0']

    # no FreezeOut config finishes: regular and its second seed are still recorded
    monkeypatch.setattr(study, 'run', fake_scripts(lambda cmd: cmd[0] == 'run_pretrain.py' and '--t_0' in cmd))
    with pytest.raises(SystemExit, match='2 run'):
        study.main([*argv[:-1], str(tmp_path / 'r2.json')])
    assert set(json.loads((tmp_path / 'r2.json').read_text())['runs']) == {'regular/seed0', 'regular/seed1'}


def test_only_pretraining_takes_the_large_batch(tmp_path, monkeypatch):
    """Default --batch_size 512 is for pretraining; scoring keeps 256 (its probe's lr and steps
    follow the batch); fine-tuning takes --finetune_batch_size (256 unless given)."""
    import study
    data = make_demo_data(tmp_path)
    batches = {}
    fake = fake_scripts(lambda cmd: False)

    def record(cmd, log):
        cmd = [str(c) for c in cmd]
        batches.setdefault(cmd[0], set()).add(cmd[cmd.index('--batch_size') + 1])
        return fake(cmd, log)
    monkeypatch.setattr(study, 'run', record)
    argv = ['--device', 'cpu', '--data_path', str(data), '--out', str(tmp_path / 'runs')]
    study.main([*argv, '--results', str(tmp_path / 'r.json')])
    assert batches == {'run_pretrain.py': {'512'}, 'run_knn.py': {'256'}, 'run_finetune.py': {'256'}}
    batches.clear()
    study.main([*argv, '--results', str(tmp_path / 'r2.json'), '--finetune_batch_size', '96'])
    assert batches == {'run_pretrain.py': {'512'}, 'run_knn.py': {'256'}, 'run_finetune.py': {'96'}}


def test_a_failing_script_raises_run_failed_with_its_last_lines(tmp_path):
    import study
    log = tmp_path / 'log.txt'
    with pytest.raises(study.RunFailed, match=r'(?s)run_pretrain.py failed \(exit [1-9].*--t_0 .*5'):
        study.run(['run_pretrain.py', '--t_0', '5', '--device', 'cpu'], log)
    assert 'Traceback' not in log.read_text()


def test_quick_names_the_flags_it_overrides(capsys):
    import study
    args = study.get_args_parser().parse_args(['--quick', '--epochs', '5', '--model', 'MIM_vit_base_patch16'])
    study.apply_quick(args, study.get_args_parser().parse_args([]))
    assert args.epochs == 2 and args.model == 'MIM_vit_tiny_patch16'
    assert capsys.readouterr().out == ('note: --quick sets its own values in place of --model MIM_vit_base_patch16, '
                                       '--epochs 5\n')


def test_a_runs_output_goes_to_its_log_with_progress_lines_on_the_console(tmp_path, monkeypatch, capsys):
    """The console shows where a run's output goes, and its epochs' ends at most every
    ECHO_EVERY_S seconds (here every one); the log keeps every line."""
    import study
    script = tmp_path / 'fake_run.py'
    script.write_text("print('args: {}')\nfor e in range(3):\n    print(f'Epoch [{e}] done in 0:00:01: loss 0.5')\n"
                      "print('Accuracy of the network on the 8 test images: 50.0%')\n")
    log = tmp_path / 'study_log.txt'
    monkeypatch.setattr(study, 'ECHO_EVERY_S', 0.0)
    study.run([str(script)], log)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f'  (output: {log})'
    assert out[2:] == ['  Epoch [0] done in 0:00:01: loss 0.5', '  Epoch [1] done in 0:00:01: loss 0.5',
                       '  Epoch [2] done in 0:00:01: loss 0.5', '  Accuracy of the network on the 8 test images: 50.0%']
    assert log.read_text().splitlines()[0] == 'args: {}' and len(log.read_text().splitlines()) == 5
    # the lines it echoes are the scripts' own
    from engine_pretrain import epoch_done_line
    from util.log import RunEta
    stats = {'epoch_time': 1.0, 'loss': 0.5, 'images_per_s': 8.0, 'data_wait_s': 0.0}
    assert study.is_progress_line(epoch_done_line(0, stats, RunEta(2).progress(0, 1.0)))
    monkeypatch.setattr(study, 'ECHO_EVERY_S', 3600.0)
    study.run([str(script)], log)
    assert len(capsys.readouterr().out.splitlines()) == 2 and len(log.read_text().splitlines()) == 10


def test_the_best_config_line_shows_every_score_and_says_why_it_is_the_best(capsys):
    """The best config by kNN + linear (scores compared as printed); a tie names the other config;
    a choice recorded by an earlier invocation is kept, and the line says so."""
    import argparse
    import study

    class Recorder:  # stands in for study.Study: pretrain returns the scores given
        def __init__(self, scores, best=None):
            self.scores, self.results = scores, ({'best': best} if best else {})

        def pretrain(self, name, flags, seed):
            return {'knn_top1': self.scores[name], 'linprobe_top1': 50.0} if name in self.scores else None

        def finetune(self, key):
            pass

        def save(self):
            pass

    args = argparse.Namespace(seeds=[0, 1], no_finetune=True, quick=True, rerun=False)
    a, b = study.QUICK_CONFIGS
    study.run_study(Recorder({a: 60.0, b: 70.0}), args)
    assert f'best FreezeOut config by 20-NN + linear accuracy: {b} ({b} 120.00, {a} 110.00)' in capsys.readouterr().out
    study.run_study(Recorder({a: 60.001, b: 60.0}), args)
    assert f': {a} ({a} 110.00, {b} 110.00; tied with {b}: the first in the study\'s order is taken)' \
        in capsys.readouterr().out
    recorder = Recorder({a: 60.0, b: 70.0}, best=a)
    study.run_study(recorder, args)
    assert f': {a} ({b} 120.00, {a} 110.00; chosen by an earlier invocation of the study and kept)' \
        in capsys.readouterr().out and recorder.results['best'] == a


def test_an_interrupted_study_stops_its_run(tmp_path, monkeypatch):
    """Ctrl-C reaching the study alone (or any error while it relays the run's output) stops the run
    too: it must not go on holding the GPU and its folder."""
    import os
    import study
    script = tmp_path / 'slow_run.py'
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    pids = []

    def interrupt_at_first_line(line):
        pids.append(int(line))
        raise KeyboardInterrupt
    monkeypatch.setattr(study, 'is_progress_line', interrupt_at_first_line)
    with pytest.raises(KeyboardInterrupt):
        study.run([str(script)], tmp_path / 'study_log.txt')
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # killed and reaped
