"""util.runtime.run_main under a launcher: what stops a rank is written where torchrun's closing
summary ("Root Cause") reads it back, instead of the summary's bare link to the docs."""
from __future__ import annotations

import argparse
import sys

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from util import runtime


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='run_x.py')
    p.add_argument('--t_0', type=float, default=None)
    return p


def stop_with_error_line(args):
    raise SystemExit('error: --data_path /nowhere does not exist')


def fail_with_exception(args):
    raise RuntimeError('CUDA out of memory (simulated)')


def stop_with_ctrl_c(args):
    raise KeyboardInterrupt


def stop_with_status(args):
    raise SystemExit(3)


def launcher_summary(error_file) -> str:
    """The text torchrun prints when this rank has failed, from the file it wrote."""
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    return ChildFailedError('run_x.py', {0: failure}).format_msg()


@pytest.mark.parametrize('main, argv, shown', [
    (stop_with_error_line, [], 'error: --data_path /nowhere does not exist'),
    (fail_with_exception, [], 'RuntimeError: CUDA out of memory (simulated)'),
    (stop_with_ctrl_c, [], 'interrupted'),
    (stop_with_status, [], "exit status 3: see this rank's output above"),
    (stop_with_error_line, ['--t_0', 'high'], "run_x.py: error: argument --t_0: invalid float value: 'high'"),
])
def test_the_launchers_summary_shows_why_the_rank_stopped(main, argv, shown, tmp_path, monkeypatch, capsys):
    error_file = tmp_path / 'error.json'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(error_file))
    monkeypatch.setattr(sys, 'argv', ['run_x.py', *argv])
    with pytest.raises((SystemExit, RuntimeError)):
        runtime.run_main(main, parser(), resumable=False)
    summary = launcher_summary(error_file)
    assert shown in summary, summary
    assert 'To enable traceback' not in summary
    if main is fail_with_exception:
        assert 'in fail_with_exception' in summary  # the whole traceback, as torch's @record gives


def test_nothing_is_written_on_success_or_outside_a_launcher(tmp_path, monkeypatch):
    error_file = tmp_path / 'error.json'
    monkeypatch.setattr(sys, 'argv', ['run_x.py'])
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(error_file))
    runtime.run_main(lambda args: None, parser())
    assert not error_file.exists()
    monkeypatch.delenv('TORCHELASTIC_ERROR_FILE')
    with pytest.raises(SystemExit):
        runtime.run_main(stop_with_error_line, parser())
    assert not error_file.exists()
