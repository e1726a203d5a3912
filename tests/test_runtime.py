"""util.runtime.run_main under a launcher: what stops a rank is written where torchrun's closing
summary ("Root Cause") reads it back, instead of the summary's bare link to the docs."""
from __future__ import annotations

import argparse
import sys

import pytest
import torch
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


def test_a_rank_that_failed_because_a_peer_died_is_not_the_root_cause(tmp_path, monkeypatch):
    """torchrun names the earliest failure (whole seconds); a collective that failed because the
    other rank died is dated a second later, so the rank that died first wins a tie."""
    import json
    import time

    def peer_died(args):
        raise RuntimeError('[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:16101')
    stamps = {}
    for name, main in (('cause', fail_with_exception), ('follow-on', peer_died)):
        monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(tmp_path / f'{name}.json'))
        monkeypatch.setattr(sys, 'argv', ['run_x.py'])
        before = int(time.time())
        with pytest.raises(RuntimeError):
            runtime.run_main(main, parser())
        recorded = int(json.loads((tmp_path / f'{name}.json').read_text())['message']['extraInfo']['timestamp'])
        stamps[name] = recorded - before
    assert stamps['cause'] in (0, 1) and stamps['follow-on'] in (1, 2)


def test_a_rank_that_lost_its_peer_in_a_distributed_run_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """In a process group of several, the broken connection is a consequence: one line saying so
    (dated after the cause in the launcher's summary), not a traceback that buries the cause. The
    same words elsewhere keep their traceback: in a group of one, in an OSError, or not from the
    communication library (a data loader's socket error)."""
    import json
    import time
    world = {'size': 2}
    monkeypatch.setattr(runtime.dist, 'is_dist', lambda: True)
    monkeypatch.setattr(runtime.dist, 'get_world_size', lambda: world['size'])
    monkeypatch.setattr(sys, 'argv', ['run_x.py'])
    error_file = tmp_path / 'error.json'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(error_file))

    def raising(error: Exception):
        def main(args):
            raise error
        return main
    gloo = RuntimeError('[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer '
                        '[127.0.0.1]:16101. This is typically caused by a remote worker crashing. GLHF')
    before = int(time.time())
    with pytest.raises(SystemExit) as stop:
        runtime.run_main(raising(gloo), parser(), resumable=False)
    line = ("error: stopped because another process of this run failed first (Connection closed by peer "
            "[127.0.0.1]:16101); the launcher's closing summary names it")
    assert stop.value.code == 1 and capsys.readouterr().err == line + '\n'  # rank 0 (RANK unset) prints it
    recorded = json.loads(error_file.read_text())['message']
    assert recorded['message'] == line and int(recorded['extraInfo']['timestamp']) - before in (1, 2)
    assert line in launcher_summary(error_file)

    for error in (ConnectionResetError(104, 'Connection reset by peer'),
                  RuntimeError("Caught ProtocolError in DataLoader worker process 0: ('Connection aborted.', "
                               "ConnectionResetError(104, 'Connection reset by peer'))")):
        with pytest.raises(type(error)):
            runtime.run_main(raising(error), parser(), resumable=False)
    world['size'] = 1
    with pytest.raises(RuntimeError):
        runtime.run_main(raising(gloo), parser(), resumable=False)


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


def test_a_full_disk_is_one_line_that_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """An ENOSPC (util.checkpoint.save_atomic raises it for torch's full-disk error too) ends the
    run with one line naming the file and how to continue; other OSErrors keep their traceback."""
    import errno
    import os

    def full_disk(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / 'checkpoint-last.pth'))
    run_parser = parser()
    run_parser.add_argument('--output_dir', default=str(tmp_path))
    monkeypatch.setattr(sys, 'argv', ['run_x.py'])
    with pytest.raises(SystemExit) as e:
        runtime.run_main(full_disk, run_parser)
    assert e.value.code == 1
    err = capsys.readouterr().err
    path = tmp_path / 'checkpoint-last.pth'
    assert err.splitlines() == [f'error: no space left (disk or quota full) to write {path}: free some space; '
                                'no checkpoint was saved yet: the same command starts again']

    def missing_file(args):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), 'x')
    with pytest.raises(FileNotFoundError):
        runtime.run_main(missing_file, run_parser)


# torch's message for a CUDA allocation that failed (its first three sentences are kept)
OOM_MESSAGE = ('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which '
               '1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. If '
               'reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True')
OOM_KEPT = ('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which '
            '1.06 GiB is free.')


@pytest.mark.parametrize('flags, advice', [
    (['--batch_size', '256', '--accum_iter', '2'], 'try --batch_size 128 --accum_iter 4 (the same effective batch'),
    (['--batch_size', '9'], 'try --batch_size 3 --accum_iter 3 (the same effective batch'),  # 9 = 3 x 3, exact
    (['--batch_size', '7'], 'try --batch_size 1 --accum_iter 7 (the same effective batch'),
    (['--batch_size', '1'], '--batch_size is 1 already: a smaller --model or --input_size would need less'),
])
def test_a_gpu_out_of_memory_is_one_line_with_flags_that_keep_the_effective_batch(flags, advice, tmp_path,
                                                                                  monkeypatch, capsys):
    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
    run_parser = parser()
    run_parser.add_argument('--batch_size', type=int, default=64)
    run_parser.add_argument('--accum_iter', type=int, default=1)
    run_parser.add_argument('--output_dir', default=str(tmp_path))
    monkeypatch.setattr(sys, 'argv', ['run_x.py', *flags])
    with pytest.raises(SystemExit) as e:
        runtime.run_main(out_of_memory, run_parser)
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f'error: out of GPU memory ({OOM_KEPT}); {advice}{"" if "already" in advice else ", so the same lr)"}; '
        'no checkpoint was saved yet: that command starts again']


def test_out_of_memory_in_a_script_without_accumulation_names_its_batch_size(tmp_path):
    args = argparse.Namespace(batch_size=256)
    assert runtime.out_of_memory_line(args, torch.cuda.OutOfMemoryError(OOM_MESSAGE), resumable=False) == (
        f'error: out of GPU memory ({OOM_KEPT}); lower --batch_size (now 256)')


# ---- flags checked before any work ---------------------------------------------------------------

def namespace(**overrides) -> argparse.Namespace:
    base = dict(lr=None, blr=1e-3, min_lr=1e-6, weight_decay=0.05, warmup_epochs=1, seed=0, num_workers=0,
                start_epoch=0, epochs=2)
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize('overrides, message', [
    (dict(lr=-1.0), '--lr must be a finite number >= 0'),
    (dict(blr=float('nan')), '--blr must be a finite number >= 0'),
    (dict(min_lr=-1.0), '--min_lr must be'),
    (dict(weight_decay=-0.05), '--weight_decay must be'),
    (dict(warmup_epochs=-1), '--warmup_epochs must be'),
    (dict(seed=-1), '--seed must be in'),
    (dict(num_workers=-1), '--num_workers must be 0 or more'),
    (dict(start_epoch=-1), '--start_epoch must be in'),
    (dict(start_epoch=2), '--start_epoch must be in'),
])
def test_number_flags_torch_would_refuse_are_clear_errors(overrides, message):
    runtime.check_number_flags(namespace())  # the defaults pass
    with pytest.raises(SystemExit, match=message):
        runtime.check_number_flags(namespace(**overrides))


def test_lr_schedules_that_hardly_train_get_a_note_and_an_unknown_device_an_error(capsys):
    runtime.note_lr_schedule(argparse.Namespace(min_lr=1e-6, lr=1e-4, t_0=None))
    runtime.note_lr_schedule(argparse.Namespace(min_lr=1e-3, lr=1e-4, t_0=0.8))  # FreezeOut anneals to 0
    assert capsys.readouterr().out == ''
    # a tiny batch at the research notes' blr: lr 7.8e-7 under the default min_lr 1e-6; upstream runs it
    runtime.note_lr_schedule(argparse.Namespace(min_lr=1e-6, lr=2e-4 / 256, t_0=None))
    assert 'note: --min_lr 1e-06 is above the peak lr 7.81e-07' in capsys.readouterr().out
    runtime.note_lr_schedule(argparse.Namespace(min_lr=1e-6, lr=0.0, t_0=None, warmup_epochs=5, epochs=5))
    assert capsys.readouterr().out.splitlines() == [
        'note: the peak lr is 0 (--lr 0 or --blr 0): the weights will not change',
        'note: --warmup_epochs 5 >= --epochs 5: the lr only rises, reaching its peak at the end, with no decay; '
        'lower --warmup_epochs for one']
    runtime.note_lr_schedule(argparse.Namespace(min_lr=1e-6, lr=1e-4, t_0=None, warmup_epochs=0, epochs=3))
    assert capsys.readouterr().out == ''  # the research notes' debug run
    with pytest.raises(SystemExit, match='unknown --device bogus'):
        runtime.resolve_device_and_amp(argparse.Namespace(device='bogus', amp='auto'))


def test_an_output_folder_that_refuses_files_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    """An existing folder that cannot be written (read-only mount, immutable): said at set-up,
    not after the training (the log.txt or checkpoint write)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(1, 'Operation not permitted')
    monkeypatch.setattr(tempfile, 'TemporaryFile', refuse)
    args = namespace(output_dir=str(tmp_path), log_dir=None, device='cpu', amp='auto', world_size=1, local_rank=-1,
                     dist_url='env://', dist_backend=None)
    for var in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match=f'cannot write into --output_dir {tmp_path}: Operation not permitted'):
        runtime.setup(args)


@pytest.mark.parametrize('rank, error_file, restart, max_restarts, quiet', [
    ('1', 'file', '0', '0', True),    # rank 1, its line in the summary: rank 0's says it
    ('0', 'file', '0', '0', False),   # rank 0 always prints
    ('1', '', '0', '0', False),       # torchrun --log-dir /dev/null: no error file, no summary line
    ('1', 'file', '0', '1', False),   # a restart follows: no summary for this attempt
    ('1', 'file', '1', '1', True),    # the last attempt's summary is shown
])
def test_only_a_rank_whose_line_reaches_the_summary_stays_silent(monkeypatch, tmp_path, rank, error_file,
                                                                  restart, max_restarts, quiet):
    monkeypatch.setenv('RANK', rank)
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(tmp_path / 'error.json') if error_file else '')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', restart)
    monkeypatch.setenv('TORCHELASTIC_MAX_RESTARTS', max_restarts)
    assert runtime._told_launcher_quietly('error: --data_path /nowhere does not exist') is quiet


def test_a_restarted_group_does_not_see_the_failed_attempts_keys(monkeypatch):
    """util.dist.restart_safe_store: torchrun's store outlives a failed attempt; the restarted
    group's keys are its own (torch's env:// store would hand it the dead ranks' addresses)."""
    import datetime

    import torch.distributed as tdist

    from helpers import free_port
    from util import dist

    port = free_port()
    server = tdist.TCPStore('127.0.0.1', port, 1, is_master=True, wait_for_workers=False)
    for name, value in {'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2',
                        'LOCAL_WORLD_SIZE': '2', 'TORCHELASTIC_USE_AGENT_STORE': 'True'}.items():
        monkeypatch.setenv(name, value)
    timeout = datetime.timedelta(seconds=10)

    def store(attempt: str):
        monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', attempt)
        return dist.restart_safe_store('env://', 2, timeout)

    first = store('0')
    first.set('rank0_address', 'dead')
    assert not store('1').check(['rank0_address']) and store('0').check(['rank0_address'])
    # several nodes (agents may count restarts differently), or another init: torch's own way
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert dist.restart_safe_store('env://', 2, timeout) is None
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert dist.restart_safe_store('tcp://127.0.0.1:1234', 2, timeout) is None
    del server


def test_a_ranks_stop_line_shows_without_a_launchers_error_file(monkeypatch, capsys, tmp_path):
    """A rank other than 0 (whose print util.dist silences) that stops on an undecodable file, a full
    disk or a signal says why on its own stderr when no launcher error file will (RANK / WORLD_SIZE
    set by a script); under torchrun's last attempt, the launcher's summary says it instead."""
    import builtins

    from util import dist
    monkeypatch.setattr(builtins, 'print', builtins.print)  # restored after the test
    dist._silence_non_main_ranks(False)
    monkeypatch.setenv('RANK', '1')
    monkeypatch.delenv('TORCHELASTIC_ERROR_FILE', raising=False)
    with pytest.raises(SystemExit) as stop:
        runtime._stop('error: cannot decode x.jpg: broken', 1)
    assert stop.value.code == 1 and capsys.readouterr().err == 'error: cannot decode x.jpg: broken\n'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(tmp_path / 'error.json'))
    with pytest.raises(SystemExit):
        runtime._stop('error: cannot decode x.jpg: broken', 1)
    assert capsys.readouterr().err == '' and 'x.jpg' in (tmp_path / 'error.json').read_text()


def test_a_loader_worker_death_reported_inside_the_sigterm_handler_still_ends_as_terminated(
        tmp_path, monkeypatch, capsys):
    """SIGTERM to the process group kills the loader workers too, and torch's SIGCHLD handler can
    run at the first instruction of the SIGTERM handler, raising its 'worker killed' error there
    (seen once in the full suite). That is the SIGTERM still: one line, status 143."""
    import signal

    def main(args):
        handler = signal.getsignal(signal.SIGTERM)  # what run_main installed (one process)

        def sigchld_at_entry(frame, event, arg):  # stands in for the SIGCHLD handler's timing
            if event == 'call' and frame.f_code is handler.__code__:
                raise RuntimeError('DataLoader worker (pid 1234) is killed by signal: Terminated. ')
        sys.settrace(sigchld_at_entry)
        try:
            handler(signal.SIGTERM, None)
        finally:
            sys.settrace(None)

    def wrapped(args):  # as the DataLoader's wait for a batch re-raises it
        try:
            main(args)
        except RuntimeError as e:
            raise RuntimeError('DataLoader worker (pid(s) 1234) exited unexpectedly') from e

    def other_error(args):
        try:
            raise KeyError('x')
        except KeyError as e:
            raise RuntimeError('DataLoader worker (pid 1234) is killed by signal: Terminated. ') from e

    run_parser = parser()
    run_parser.add_argument('--output_dir', default=str(tmp_path))
    monkeypatch.setattr(sys, 'argv', ['run_x.py'])
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGCHLD)}  # run_main sets both
    try:
        for stopped_by_sigterm in (main, wrapped):
            with pytest.raises(SystemExit) as e:
                runtime.run_main(stopped_by_sigterm, run_parser)
            assert e.value.code == 143
            assert capsys.readouterr().err.splitlines() == [
                'terminated (SIGTERM); no checkpoint was saved yet: the same command starts again']
        with pytest.raises(RuntimeError):  # the same error raised elsewhere keeps its traceback
            runtime.run_main(other_error, run_parser)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
