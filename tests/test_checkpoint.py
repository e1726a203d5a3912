"""util.checkpoint: which epochs write what."""
import argparse

import pytest
import torch

from util import checkpoint


def test_save_last_freq_and_save_freq(tmp_path, monkeypatch):
    written, kept = [], []
    monkeypatch.setattr(checkpoint, 'save_atomic', lambda obj, path: written.append(obj['epoch']))
    monkeypatch.setattr(checkpoint, 'keep_copy', lambda src, dst: kept.append(dst.name))
    args = argparse.Namespace(output_dir=str(tmp_path), epochs=7, save_freq=5, save_last_freq=2)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(args.epochs):
        checkpoint.save_checkpoint(args, model, optimizer, None, epoch, extra={'frozen': {'num_frozen': 0}})
    # checkpoint-last: every 2nd epoch (1, 3, 5), and the epochs that keep a numbered copy (0, 5, 6)
    assert written == [0, 1, 3, 5, 6]
    assert kept == ['checkpoint-0.pth', 'checkpoint-5.pth', 'checkpoint-6.pth']


def test_save_flags_are_checked():
    parser = argparse.ArgumentParser()
    checkpoint.add_save_flags(parser, 20)
    args = parser.parse_args([])
    assert (args.save_freq, args.save_last_freq) == (20, 1)
    checkpoint.check_save_flags(args)
    for flags in (['--save_freq', '0'], ['--save_last_freq', '0']):
        with pytest.raises(SystemExit, match='at least 1'):
            checkpoint.check_save_flags(parser.parse_args(flags))


def test_write_text_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    from util.checkpoint import write_text_atomic
    path = tmp_path / 'results.json'
    write_text_atomic(path, 'old')
    write_text_atomic(path, 'new')
    assert path.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['results.json']


def test_start_run_folder_after_resume_drops_the_lines_it_redoes(tmp_path, capsys):
    import json
    log = tmp_path / 'log.txt'
    lines = [{'epoch': e, 'train_loss': 1.0} for e in range(4)] + [{'mode': 'eval', 'test_acc1': 5.0}]
    log.write_text(''.join(json.dumps(line) + '\n' for line in lines) + 'not json\n')
    checkpoint.start_run_folder(str(tmp_path), str(tmp_path), 2, resumed=True)
    kept = log.read_text().splitlines()
    assert [json.loads(line).get('epoch') for line in kept[:-1]] == [0, 1, None] and kept[-1] == 'not json'
    assert 'dropped 2 line(s) of epochs >= 2' in capsys.readouterr().out
    checkpoint.start_run_folder(str(tmp_path), str(tmp_path), 2, resumed=True)  # nothing more to drop
    assert log.read_text().splitlines() == kept and 'dropped' not in capsys.readouterr().out


def test_start_run_folder_of_a_fresh_run_moves_the_earlier_runs_files_aside(tmp_path, capsys):
    out, tb = tmp_path / 'out', tmp_path / 'tb'
    out.mkdir()
    tb.mkdir()
    for name in ('checkpoint-5.pth', 'checkpoint-last.pth', 'checkpoint-best.pth', 'log.txt',
                 'freezeout_schedule.json', 'cli_logs.txt'):
        (out / name).write_text(name)
    (tb / 'events.out.tfevents.1.host').write_text('events')
    torch.save({'epoch': 5}, out / 'checkpoint-last.pth')
    assert checkpoint._newest_checkpoint(out) is not None
    checkpoint.start_run_folder(str(out), str(tb), 0, resumed=False)
    moved = list(out.glob('previous-*'))
    assert len(moved) == 1 and sorted(p.name for p in moved[0].iterdir()) == [
        'checkpoint-5.pth', 'checkpoint-best.pth', 'checkpoint-last.pth', 'log.txt']
    assert [p.name for p in (next(tb.glob('previous-*'))).iterdir()] == ['events.out.tfevents.1.host']
    # what the new run writes itself, or record.sh appends to, stays
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ['cli_logs.txt', 'freezeout_schedule.json']
    assert checkpoint._newest_checkpoint(out) is None  # a later auto-resume finds only the new run's
    assert 'moved to previous-' in capsys.readouterr().out
    checkpoint.start_run_folder(str(out), str(tb), 0, resumed=False)  # an empty folder: nothing to do
    assert len(list(out.glob('previous-*'))) == 1 and capsys.readouterr().out == ''


def test_resumed_writer_hides_what_the_interrupted_run_logged_after_the_checkpoint(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from util.log import make_writer
    first = make_writer(str(tmp_path))
    for step in range(0, 3000, 500):  # epochs 0, 1, 2 on the epoch_1000x axis; interrupted in epoch 2
        first.add_scalar('train_loss', 1.0, step)
    first.close()
    resumed = make_writer(str(tmp_path), resumed_at_epoch=2)  # the checkpoint held epoch 1
    for step in range(2000, 4000, 500):
        resumed.add_scalar('train_loss', 2.0, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars('train_loss')]
    assert points == [(0, 1.0), (500, 1.0), (1000, 1.0), (1500, 1.0),
                      (2000, 2.0), (2500, 2.0), (3000, 2.0), (3500, 2.0)]


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    checkpoint.lock_run_folder(str(tmp_path))  # this process now trains into tmp_path
    try:
        with pytest.raises(SystemExit, match=r'another run is training into .* \(pid \d+ on '):
            checkpoint.lock_run_folder(str(tmp_path))  # a second open of the lock file conflicts
    finally:
        checkpoint._held_locks.pop().close()  # as the process's exit would
    checkpoint.lock_run_folder(str(tmp_path))  # free again
    checkpoint._held_locks.pop().close()
    checkpoint.lock_run_folder(None)  # no folder: nothing to lock
