"""Every script's --help: each flag says what it does, and its default appears once, never as
"(default: True)" after an off switch; --help and a refused flag come before torch is imported."""
import importlib
import json
import re
import subprocess
import sys

import pytest

SCRIPTS = ['run_pretrain', 'run_finetune', 'run_linprobe', 'run_knn', 'benchmark', 'study']


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_flag_has_a_help_text_and_one_default(name):
    parser = importlib.import_module(name).get_args_parser()
    for action in parser._actions:
        if action.option_strings and action.help != '==SUPPRESS==':
            assert action.help and len(action.help) > 5, (name, action.option_strings)
    for block in parser.format_help().split('\n  -'):  # one flag's help each
        assert block.count('(default: ') <= 1, block
        if block.lstrip('-').startswith('no_'):
            assert '(default: True)' not in block, block


def test_help_formatter_appends_the_default_only_where_the_help_is_silent():
    import argparse

    from util.cli import HelpFormatter
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument('--epochs', default=400, type=int, help='epochs')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin memory')
    text = ' '.join(p.format_help().split())
    assert '--epochs EPOCHS epochs (default: 400)' in text
    assert '(default: cuda when available)' in text and '(default: None)' not in text
    assert 'do not pin memory' in text and '(default: True)' not in text


# ---- flag values refused before any work (a traceback from torch, numpy or timm before) ----------

def _parse(script: str, flags: list[str]):
    return importlib.import_module(script).get_args_parser().parse_args(flags)


TINY_PRETRAIN = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32']
TINY_CLASSIFIER = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4']


@pytest.mark.parametrize('script, flags, message', [
    ('run_pretrain', [*TINY_PRETRAIN, '--mask_ratio', '0.9'], 'leaves none of the 4 tokens visible'),
    ('run_pretrain', [*TINY_PRETRAIN, '--hog_nbins', '0'], '--hog_nbins must be at least 1'),
    ('run_pretrain', [*TINY_PRETRAIN, '--gpu_resample', 'pil'], 'applies to the gpu backends only'),
    ('run_pretrain', ['--model', 'MIM_vit_tiny_patch16', '--input_size', '0'], 'below two patches'),
    ('run_pretrain', ['--model', 'MIM_vit_tiny_patch16', '--input_size', '48'], '--input_size 64 or --input_size 32'),
    ('run_finetune', [*TINY_CLASSIFIER, '--input_size', '0'], 'not a positive multiple of the patch size'),
    ('run_finetune', [*TINY_CLASSIFIER, '--drop_path', '1.5'], '--drop_path must be in [0, 1)'),
    ('run_finetune', [*TINY_CLASSIFIER, '--reprob', '2'], '--reprob must be in [0, 1]'),
    ('run_finetune', [*TINY_CLASSIFIER, '--mixup', '-1'], 'Beta alphas'),
    ('run_finetune', [*TINY_CLASSIFIER, '--cutmix_minmax', '0.9', '0.3'], '0 < MIN < MAX <= 1'),
    ('run_finetune', [*TINY_CLASSIFIER, '--clip_grad', '-1'], '--clip_grad must be above 0'),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'bogus'], 'not a timm augmentation policy'),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'none', '--color_jitter', '-1'],
     '--color_jitter must be a finite number >= 0'),
    ('run_finetune', [*TINY_CLASSIFIER, '--color_jitter', 'nan'], '--color_jitter must be a finite number >= 0'),
    ('run_finetune', [*TINY_CLASSIFIER, '--mixup', 'nan'], 'Beta alphas'),
    # sections timm skips without a word: a typo trained with the default
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'rand-m9-mstd0.5-incl'],
     "unknown section 'incl'; rand takes m<int> magnitude, n<int> ops per image, p<float> probability of each op, "
     "mstd<float> magnitude std, mmax<int> magnitude limit, inc<0|1> severity increasing with magnitude, t<set>"),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'rand-bogus'], "unknown section 'bogus'; rand takes m<int>"),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'rand-m9-tweight'], "unknown transform set 'tweight'"),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'augmix-m5-s2'], "unknown section 's2'; augmix takes m<int>"),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'original-m5'], "unknown section 'm5'; original takes mstd<float>"),
    ('run_finetune', [*TINY_CLASSIFIER, '--aa', 'rand-m9x'], 'not a timm augmentation policy'),  # timm's own parse
    ('run_finetune', [*TINY_CLASSIFIER, '--recount', '0'], '--recount must be at least 1'),
    ('run_linprobe', [*TINY_CLASSIFIER, '--momentum', '2'], '--momentum must be in [0, 1)'),
])
def test_bad_values_are_refused_by_the_scripts_checks(script, flags, message):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match=re.escape(message)):
        module.check_args(_parse(script, flags))


def test_the_scripts_checks_pass_their_defaults_and_the_paper_recipes():
    import run_finetune
    import run_linprobe
    import run_pretrain
    run_pretrain.check_args(_parse('run_pretrain', ['--mask_ratio', '0.75']))
    run_finetune.check_args(_parse('run_finetune', ['--mixup', '0.8', '--cutmix', '1.0', '--drop_path', '0.2',
                                                    '--cutmix_minmax', '0.2', '0.8', '--aa', 'original']))
    run_linprobe.check_args(_parse('run_linprobe', []))


@pytest.mark.parametrize('aa', ['rand-m9-mstd0.5-inc1', 'rand-m9-mstd0.5', 'rand-m7-mstd0.5-inc1', 'rand-m9-n3-mstd0.5',
                                'rand-mstd1-tweights', 'rand-m9-mstd101-mmax12-p0.7-t3aw', 'original', 'originalr',
                                'v0', 'v0r', '3a', 'original-mstd0.5', 'augmix-m5-w4-d2', 'augmix-m3-mstd0.5-b1-a1',
                                'none', 'None', ''])
def test_every_aa_form_timm_reads_whole_passes(aa):
    """The upstream default and the other forms of timm's three parsers, every section known."""
    import run_finetune
    run_finetune.check_args(_parse('run_finetune', [*TINY_CLASSIFIER, '--aa', aa]))


def test_fixed_choices_and_value_counts_are_argparse_errors(capsys):
    for flags in (['--remode', 'bogus'], ['--cutmix_minmax', '0.5']):
        with pytest.raises(SystemExit):
            _parse('run_finetune', flags)
        assert 'error: argument' in capsys.readouterr().err



@pytest.mark.parametrize('name', SCRIPTS)
def test_a_flag_error_is_one_line_under_the_scripts_name_with_the_closest_flags(name, capsys, monkeypatch):
    """Not argparse's usage block (dozens of lines here) under the description as a name."""
    monkeypatch.setattr('sys.argv', [f'/repo/ViT/{name}.py'])  # as when the script runs
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(name).get_args_parser().parse_args(['--modle', 'x', '--zzzz'])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f'{name}.py: error: unrecognized arguments: --modle x --zzzz (did you mean '
                                       f'--model?); {name}.py --help lists the flags\n')
    if name == 'run_pretrain':
        with pytest.raises(SystemExit):
            importlib.import_module(name).get_args_parser().parse_args(['--t0=0.8', '--how-scale', 'linear'])
        assert '(did you mean --t_0 / --how_scale?)' in capsys.readouterr().err
        with pytest.raises(SystemExit):  # two near-misses of one flag name it once
            importlib.import_module(name).get_args_parser().parse_args(['--epochz', '1', '--epohcs', '2'])
        assert '(did you mean --epochs?)' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['run_finetune', 'run_linprobe', 'run_knn'])
def test_global_pool_and_cls_token_together_are_refused(name, capsys):
    """Two read-outs at once: an argparse error, not whichever came last."""
    with pytest.raises(SystemExit):
        _parse(name, ['--global_pool', '--cls_token'])
    assert 'argument --cls_token: not allowed with argument --global_pool' in capsys.readouterr().err
    assert _parse(name, ['--cls_token']).global_pool is False and _parse(name, ['--global_pool']).global_pool


def test_a_folder_given_as_a_checkpoint_says_so(tmp_path):
    import run_finetune
    from util import checkpoint
    with pytest.raises(SystemExit, match=f'--resume {tmp_path} is a folder, not a checkpoint file'):
        run_finetune.check_args(_parse('run_finetune', [*TINY_CLASSIFIER, '--resume', str(tmp_path)]))
    with pytest.raises(checkpoint.CheckpointError, match='is a folder'):
        checkpoint.load(tmp_path)


def test_helper_scripts_refuse_what_run_pretrain_refuses(tmp_path, capsys):
    import estimate_speedup
    import plot_lr_schedule
    for main in (estimate_speedup.main, plot_lr_schedule.main):
        with pytest.raises(SystemExit, match='--epochs must be at least 1'):
            main(['--t_0', '0.8', '--epochs', '0'])
        with pytest.raises(SystemExit, match='below two patches'):
            main(['--t_0', '0.8', '--input_size', '0'])
    with pytest.raises(SystemExit, match='is a folder; give a file name'):
        plot_lr_schedule.main(['--t_0', '0.8', '--out', str(tmp_path)])
    written = plot_lr_schedule.main(['--t_0', '0.8', '--epochs', '10', '--warmup_epochs', '1', '--points', '50',
                                     '--out', str(tmp_path / 'schedule')])
    assert written == tmp_path / 'schedule.png' and written.is_file()
    assert f'wrote {written}' in capsys.readouterr().out


def test_benchmark_and_study_refuse_missing_or_bad_inputs(tmp_path):
    import benchmark
    import study
    with pytest.raises(SystemExit, match='is not a folder'):
        benchmark.main(['--check_targets', str(tmp_path / 'nowhere')])
    bad = tmp_path / 'results.json'
    for text, message in (('{bad json', 'cannot read the results file'), ('[]', 'is not a study results file')):
        bad.write_text(text)
        with pytest.raises(SystemExit, match=message):
            study.load_results(bad)
    no_splits = r'needs train/ and val/ class folders \(e\.g\. /.*imagenette-128\)$'
    for where, message in ((tmp_path / 'nowhere', 'does not exist$'), (tmp_path, no_splits)):
        with pytest.raises(SystemExit, match=message):
            study.main(['--quick', '--device', 'cpu', '--data_path', str(where), '--out', str(tmp_path / 'runs')])
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        (data / split / 'a').mkdir(parents=True)
        (data / split / 'a' / 'notes.txt').write_text('no images here')
    with pytest.raises(SystemExit, match='error: '):  # before any run, not once per run
        study.main(['--quick', '--device', 'cpu', '--data_path', str(data), '--out', str(tmp_path / 'runs')])
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('script', ['run_pretrain', 'run_finetune', 'run_linprobe', 'run_knn'])
def test_a_missing_data_path_stops_before_the_output_folder_is_made(script, tmp_path):
    """A mistyped --data_path used to leave an empty output folder holding only its .run.lock."""
    from util.runtime import setup
    out = tmp_path / 'out'
    args = _parse(script, ['--data_path', str(tmp_path / 'nowhere'), '--output_dir', str(out), '--device', 'cpu'])
    with pytest.raises(SystemExit, match=f'^error: --data_path {re.escape(str(tmp_path))}/nowhere does not exist$'):
        setup(args)
    assert not out.exists()


def test_an_output_folder_behind_a_folder_that_cannot_be_entered_is_an_error_line(tmp_path, monkeypatch):
    """Path.exists raises PermissionError under a folder this user cannot enter (root can enter
    any, so the test makes exists raise as it would)."""
    import pathlib
    from util.cli import check_output_folder

    def no_entry(self, *a, **k):
        raise PermissionError(13, 'Permission denied', str(self))
    monkeypatch.setattr(pathlib.Path, 'exists', no_entry)
    with pytest.raises(SystemExit, match=r'^error: cannot create --out .*: Permission denied$'):
        check_output_folder(tmp_path / 'locked' / 'out', f'--out {tmp_path / "locked" / "out"}')


def test_vit_python_sets_the_command_the_tools_start_their_runs_with(tmp_path, monkeypatch):
    """study.py's (and demo.py's) runs start with $VIT_PYTHON split on spaces; unset or blank: this
    interpreter; a first word that is no command: one error line."""
    import sys

    import study
    from util.cli import python_command
    wrapper = tmp_path / 'wrapped'
    wrapper.write_text(f'#!/bin/sh\necho "$1 $2" >> {tmp_path / "calls"}\nshift\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    for blank in (None, '', '  '):
        if blank is None:
            monkeypatch.delenv('VIT_PYTHON', raising=False)
        else:
            monkeypatch.setenv('VIT_PYTHON', blank)
        assert python_command() == [sys.executable]
    monkeypatch.setenv('VIT_PYTHON', './wrapped --tag')  # from the caller's folder, though the runs start in ViT/
    monkeypatch.chdir(tmp_path)
    assert python_command() == [str(wrapper), '--tag']
    (tmp_path / 'hello.py').write_text('print("hello from the run")\n')
    study.run([str(tmp_path / 'hello.py')], tmp_path / 'log.txt')
    assert (tmp_path / 'calls').read_text() == f'--tag {tmp_path / "hello.py"}\n'
    assert (tmp_path / 'log.txt').read_text() == 'hello from the run\n'
    monkeypatch.setenv('VIT_PYTHON', 'no-such-python3 -X dev')
    with pytest.raises(SystemExit, match=r"^error: VIT_PYTHON='no-such-python3 -X dev': no-such-python3 is not a "
                                         r"command that can be started; unset VIT_PYTHON"):
        python_command()


# ---- --help and a refused flag without torch ----------------------------------------------------

HEAVY = ('torch', 'torchvision', 'timm')
ENTRY_SCRIPTS = ['run_pretrain', 'run_finetune', 'run_linprobe', 'run_knn', 'study', 'benchmark']


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level names of the modules in `python -X importtime`'s report."""
    return {line.split('|')[-1].strip().split('.')[0] for line in importtime_stderr.splitlines()
            if line.startswith('import time:')}


FLAG_ANSWERS = {  # what each script says, and its exit status
    'help': (['--help'], 0, 'usage: '),
    'unknown': (['--epochs_typo', '3'], 2, 'error: unrecognized arguments: --epochs_typo 3'),
    'bad_value': (['--batch_size', 'x'], 2, "error: argument --batch_size: invalid int value: 'x'"),
    # the study checks it too: a wrong one used to fail each of its runs in turn
    'bad_backend': (['--data_backend', 'nope'], 2, "error: argument --data_backend: invalid choice: 'nope'"),
}


@pytest.mark.parametrize('name,case', [(name, case) for name in ENTRY_SCRIPTS for case in FLAG_ANSWERS
                                       if case != 'bad_backend' or name in ('run_pretrain', 'study')])
def test_help_and_flag_errors_are_answered_before_torch_loads(name, case):
    """A fresh interpreter (the warm one has torch loaded): the answer comes without importing
    torch, timm or torchvision, which take seconds."""
    flags, status, shown = FLAG_ANSWERS[case]
    from helpers import VIT, subprocess_env
    done = subprocess.run([sys.executable, '-X', 'importtime', f'{name}.py', *flags], cwd=VIT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr[-3000:]
    assert shown in done.stdout + done.stderr
    assert not _imported_modules(done.stderr) & set(HEAVY), sorted(_imported_modules(done.stderr) & set(HEAVY))


def test_under_a_launcher_a_refused_flag_still_reaches_the_launchers_summary(tmp_path):
    """The early answer stands aside under torchrun: run_main writes the flag error to the file
    whose contents the launcher's closing summary shows, and a rank other than 0 stays silent."""
    from helpers import VIT, subprocess_env
    error_file = tmp_path / 'error.json'
    done = subprocess.run([sys.executable, 'run_pretrain.py', '--epochs_typo', '3'], cwd=VIT, capture_output=True,
                          env=subprocess_env(TORCHELASTIC_ERROR_FILE=str(error_file), RANK='1'), text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert 'unrecognized arguments: --epochs_typo 3' in json.loads(error_file.read_text())['message']['message']
    assert 'error' not in done.stderr
