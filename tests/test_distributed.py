"""Two CPU processes (gloo) under `python -m torch.distributed.launch` and `torchrun`, with
FreezeOut events inside the run: clean exit, rank 0 alone writes, and every rank ends with the
same weights and optimizer state (DDP is rebuilt at each freeze event; a hang fails the test)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import (BATCH, COMMON, NUM_IMAGES, VIT, assert_same_optimizer_state, assert_same_tensors,
                     free_port, frozen_at, load_ckpt, make_demo_data, read_log, read_schedule, run_cmd,
                     subprocess_env)

NPROC = 2
TIMEOUT = 120

# run_pretrain.main, with save_checkpoint wrapped so that every rank (not only rank 0) also dumps
# its model and optimizer state after the last epoch
WRAPPER = '''
import os, sys
sys.path.insert(0, {vit!r})
import torch
import run_pretrain

_save = run_pretrain.save_checkpoint


def save_checkpoint(args, model, optimizer, loss_scaler, epoch, **kwargs):
    _save(args, model, optimizer, loss_scaler, epoch, **kwargs)
    if epoch + 1 == args.epochs:
        torch.save({{'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch}},
                   os.path.join(os.environ['RANK_DUMP_DIR'], 'rank%s.pt' % os.environ['RANK']))


run_pretrain.save_checkpoint = save_checkpoint

if __name__ == '__main__':
    run_pretrain.main(run_pretrain.get_args_parser().parse_args())
'''


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_demo_data(tmp_path_factory.getbasetemp())


def launcher(kind: str, port: int) -> list[str]:
    opts = [f'--nproc_per_node={NPROC}', '--master_addr=127.0.0.1', f'--master_port={port}']
    if kind == 'launch':
        return [sys.executable, '-m', 'torch.distributed.launch', *opts]
    torchrun = Path(sys.executable).with_name('torchrun')
    if torchrun.exists():
        return [str(torchrun), *opts]
    found = shutil.which('torchrun')
    return [found, *opts] if found else [sys.executable, '-m', 'torch.distributed.run', *opts]


def run_two_processes(kind: str, data: Path, tmp_path: Path, flags: list[str]):
    wrapper = tmp_path / 'wrapped_run_pretrain.py'
    wrapper.write_text(WRAPPER.format(vit=str(VIT)))
    dumps, out = tmp_path / 'dumps', tmp_path / 'out'
    dumps.mkdir()
    cmd = [*launcher(kind, free_port()), str(wrapper), *COMMON, '--data_path', str(data),
           '--output_dir', str(out), '--save_freq', '1', *flags]
    res = run_cmd(cmd, timeout=TIMEOUT, cwd=VIT, env=subprocess_env(RANK_DUMP_DIR=str(dumps)))
    assert res.returncode == 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    return res, out, dumps


def check_run(res, out: Path, dumps: Path, epochs: int, steps_per_epoch: int) -> dict:
    sched = read_schedule(out)
    total = epochs * steps_per_epoch
    assert sched['total_steps'] == total

    # rank 0 alone writes: one log line per epoch, and the checkpoints
    log = read_log(out)
    assert [r['epoch'] for r in log] == list(range(epochs))
    assert log[-1]['train_frozen_layers'] == frozen_at(sched, total - 1) > 0
    assert (out / 'checkpoint-last.pth').is_file() and (out / f'checkpoint-{epochs - 1}.pth').is_file()
    assert res.stdout.count('Start training') == 1  # non-zero ranks are silent

    # every freeze event happened, once, at its step
    events = sorted({r['freeze_step'] for r in sched['layers'] if r['freeze_step'] < total})
    announced = [int(line.split()[2].rstrip(':')) for line in res.stdout.splitlines()
                 if line.startswith('FreezeOut: step')]
    assert events and announced == events, (events, announced)

    # all ranks hold the same weights and optimizer state; rank 0's are the checkpoint's
    files = sorted(p.name for p in dumps.iterdir())
    assert files == [f'rank{r}.pt' for r in range(NPROC)], files
    ranks = [torch.load(dumps / f'rank{r}.pt', map_location='cpu', weights_only=True) for r in range(NPROC)]
    for r in range(1, NPROC):
        assert ranks[r]['epoch'] == epochs - 1
        assert_same_tensors(ranks[0]['model'], ranks[r]['model'], f'model rank 0 vs {r}')
        assert_same_optimizer_state(ranks[0]['optimizer'], ranks[r]['optimizer'], f'optimizer rank 0 vs {r}')
    ckpt = load_ckpt(out / 'checkpoint-last.pth')
    assert_same_tensors(ckpt['model'], ranks[0]['model'], 'checkpoint vs rank 0')
    assert len(ckpt['rng']) == NPROC  # each rank's RNG stream is kept for resuming
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])  # ranks draw different masks
    return sched


@pytest.mark.long
def test_launch_with_accumulation_and_freezeout(data, tmp_path):
    """torch.distributed.launch (passes --local-rank), accum_iter 2: freeze events only at
    optimizer-step boundaries, some at epoch starts and some inside an epoch."""
    epochs, accum = 4, 2
    res, out, dumps = run_two_processes('launch', data, tmp_path, [
        '--epochs', str(epochs), '--accum_iter', str(accum), '--t_0', '0.5', '--how_scale', 'linear'])
    assert f'effective batch: {BATCH * accum * NPROC}' in res.stdout
    steps_per_epoch = NUM_IMAGES // (BATCH * NPROC) // accum  # 2
    sched = check_run(res, out, dumps, epochs, steps_per_epoch)
    events = {r['freeze_step'] for r in sched['layers'] if r['freeze_step'] < sched['total_steps']}
    assert any(s % steps_per_epoch for s in events) and any(s % steps_per_epoch == 0 for s in events)

    # a requeued job: the same command, in a folder holding only checkpoint-1.pth, resumes at
    # epoch 2 and ends with the uninterrupted run's weights and optimizer state, on every rank
    requeued = tmp_path / 'requeued'
    (requeued / 'out').mkdir(parents=True)
    shutil.copy2(out / 'checkpoint-1.pth', requeued / 'out')
    res, out2, dumps2 = run_two_processes('launch', data, requeued, [
        '--epochs', str(epochs), '--accum_iter', str(accum), '--t_0', '0.5', '--how_scale', 'linear'])
    assert 'continuing at epoch 2' in res.stdout, res.describe()
    first, again = load_ckpt(out / 'checkpoint-last.pth'), load_ckpt(out2 / 'checkpoint-last.pth')
    assert_same_tensors(first['model'], again['model'], 'model after a 2-process resume')
    assert_same_optimizer_state(first['optimizer'], again['optimizer'], 'optimizer after a 2-process resume')
    rank1 = torch.load(dumps2 / 'rank1.pt', map_location='cpu', weights_only=True)
    assert_same_tensors(again['model'], rank1['model'], 'resumed: rank 0 vs rank 1')


@pytest.mark.long
def test_torchrun_freeze_events_mid_epoch_no_hang(data, tmp_path):
    """torchrun; every freeze event (layers and LocalMIM taps) falls inside an epoch, so the
    DDP wrapper is rebuilt between two iterations on both ranks. A hang is a timeout failure."""
    epochs = 4
    res, out, dumps = run_two_processes('torchrun', data, tmp_path, [
        '--epochs', str(epochs), '--t_0', '0.85', '--how_scale', 'linear'])
    steps_per_epoch = NUM_IMAGES // (BATCH * NPROC)  # 4
    sched = check_run(res, out, dumps, epochs, steps_per_epoch)
    total = sched['total_steps']
    events = sorted({r['freeze_step'] for r in sched['layers'] if r['freeze_step'] < total})
    assert len(events) >= 2 and all(s % steps_per_epoch for s in events), events
    # LocalMIM taps read blocks 1, 3, 9, 11 (FreezeOut layers 2, 4, 10, 12); a tap is dropped
    # (decoder_freeze 'tap') with its block, here inside an epoch too
    frozen = frozen_at(sched, total - 1)
    expected_live = sum(1 for layer in (2, 4, 10, 12) if layer >= frozen)
    assert 0 < expected_live < 4
    assert read_log(out)[-1]['train_live_taps'] == expected_live

    # relaunching the finished run (auto-resume from its last checkpoint, as a requeued job
    # would) trains nothing and exits cleanly, even though every layer counts as frozen at step T
    again = run_cmd([*launcher('torchrun', free_port()), 'run_pretrain.py', *COMMON, '--data_path', str(data),
                     '--output_dir', str(out), '--epochs', str(epochs), '--t_0', '0.85', '--how_scale', 'linear',
                     '--world_size', '4'], timeout=TIMEOUT, cwd=VIT)
    assert again.returncode == 0, again.describe()
    assert f'all {epochs} epochs are done' in again.stdout
    # a --world_size that is not the launcher's count: the real one is used, and said once
    assert again.stdout.count('note: --world_size 4, but 2 process(es) were started by the launcher') == 1
    assert 'start 4 with torchrun --nproc_per_node=4' in again.stdout
    assert len(read_log(out)) == epochs  # nothing appended


def test_world_size_flag_without_a_launcher_is_a_note(monkeypatch, capsys):
    import argparse

    from util import dist
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(world_size=4, local_rank=-1, device='cpu', dist_backend=None, dist_url='env://')
    dist.init_distributed_mode(args)
    assert (args.world_size, args.distributed) == (1, False)
    assert 'note: --world_size 4, but 1 process(es) run (no launcher)' in capsys.readouterr().out
    args.world_size, args.local_rank = 4, 0  # --local-rank: what torch.distributed.launch passes
    dist.init_distributed_mode(args)
    assert 'start 4 with python -m torch.distributed.launch --nproc_per_node=4' in capsys.readouterr().out
    args.world_size = 1  # upstream's default: nothing to say
    dist.init_distributed_mode(args)
    assert capsys.readouterr().out == ''


# run_pretrain under util.runtime.run_main, with one rank stopping as an epoch starts: `when` and
# `stop` are Python expressions (os and signal are imported)
STOPPING_RANK = '''
import os, signal, sys
sys.path.insert(0, {vit!r})
import run_pretrain
from util.runtime import run_main

_train_one_epoch = run_pretrain.train_one_epoch


def train_one_epoch(handle, loader, optimizer, device, epoch, *rest, **kwargs):
    if {when}:
        {stop}
    return _train_one_epoch(handle, loader, optimizer, device, epoch, *rest, **kwargs)


run_pretrain.train_one_epoch = train_one_epoch

if __name__ == '__main__':
    run_main(run_pretrain.main, run_pretrain.get_args_parser())
'''

# rank 1 alone failing as its second epoch starts (an OOM on one GPU, say); rank 0 then loses its
# peer inside the gradient all-reduce
FAILING_RANK = dict(when="os.environ['RANK'] == '1' and epoch == 1",
                    stop="raise RuntimeError('simulated failure on rank 1')")


def test_the_launchers_summary_names_the_rank_that_failed_and_why(data, tmp_path):
    """Without an error file, torchrun's closing "Root Cause" shows only a link to its docs, and
    the failing rank's traceback is buried above the other ranks' output (and under the traceback
    of the rank that lost its peer)."""
    wrapper = tmp_path / 'failing_rank.py'
    wrapper.write_text(STOPPING_RANK.format(vit=str(VIT), **FAILING_RANK))
    res = run_cmd([*launcher('torchrun', free_port()), str(wrapper), *COMMON, '--data_path', str(data),
                   '--output_dir', str(tmp_path / 'out'), '--epochs', '3'], timeout=TIMEOUT, cwd=VIT)
    assert res.returncode != 0, res.describe()
    root_cause = res.output[res.output.rfind('Root Cause'):]
    assert 'rank      : 1 (local_rank: 1)' in root_cause, res.describe()
    assert 'RuntimeError: simulated failure on rank 1' in root_cause, res.describe()
    assert 'To enable traceback' not in res.output, res.describe()
    # rank 0, left in the all-reduce (unless the launcher's SIGTERM came first), says so in one line
    assert 'Connection closed' not in res.output and 'GLHF' not in res.output, res.describe()


# in the launcher's first attempt rank 0 dies (SIGKILL: no handler, no error file) as its third
# epoch starts, after checkpoint-last.pth of epoch 1 was written
KILLED_RANK = dict(when="os.environ['RANK'] == '0' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' and epoch == 2",
                   stop='os.kill(os.getpid(), signal.SIGKILL)')


@pytest.mark.long
def test_torchrun_max_restarts_brings_the_group_back_and_it_resumes(data, tmp_path):
    """torchrun --max-restarts=1 after a worker dies: the restarted group gets a fresh store
    (util.dist.restart_safe_store; torch's own rendezvous hands it the dead attempt's keys and
    most restarts fail or hang), resumes from checkpoint-last.pth and finishes the FreezeOut run."""
    wrapper = tmp_path / 'killed_rank.py'
    wrapper.write_text(STOPPING_RANK.format(vit=str(VIT), **KILLED_RANK))
    out, epochs = tmp_path / 'out', 4
    res = run_cmd([*launcher('torchrun', free_port()), '--max-restarts=1', str(wrapper), *COMMON,
                   '--data_path', str(data), '--output_dir', str(out), '--epochs', str(epochs),
                   '--t_0', '0.5', '--how_scale', 'linear'], timeout=TIMEOUT, cwd=VIT)
    assert res.returncode == 0, res.describe()
    assert 'resumed from' in res.stdout and 'continuing at epoch 2' in res.stdout, res.describe()
    log = read_log(out)
    assert [r['epoch'] for r in log] == list(range(epochs)), res.describe()
    assert log[-1]['train_frozen_layers'] > 0


@pytest.mark.parametrize('flags, line', [
    (['--epochs', '2', '--t_0', '0.5'], 'error: the first layer would freeze'),  # a check of run_pretrain
    (['--epochs', 'x'], 'error: argument --epochs: invalid int value'),  # an argparse error
    (['--output_dir', 'a_file/out'], 'error: cannot create --output_dir'),  # rank 0's check, handed to rank 1
])
def test_an_error_every_rank_stops_on_is_printed_once(data, tmp_path, flags, line):
    """Rank 0 prints it; the launcher's summary still shows each rank's, from its error file. A
    check rank 0 alone makes (the output folder) stops rank 1 with the same line, not with a
    broken connection's traceback."""
    (tmp_path / 'a_file').write_text('not a folder')
    res = run_cmd([*launcher('torchrun', free_port()), 'run_pretrain.py', *COMMON, '--data_path', str(data),
                   '--output_dir', str(tmp_path / 'out'), *[str(tmp_path / f) if '/' in f else f for f in flags]],
                  timeout=TIMEOUT, cwd=VIT)
    assert res.returncode != 0, res.describe()
    console, summary = res.output.split('ChildFailedError')[0], res.output.split('ChildFailedError')[-1]
    assert console.count(line) == 1, res.describe()
    assert 'Connection closed' not in res.output and 'ViT/util/' not in console, res.describe()  # no rank's traceback
    assert summary.count(line) == NPROC, res.describe()  # Failures (rank 1 or 0) and Root Cause
