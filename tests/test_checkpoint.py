"""util.checkpoint: which epochs write what."""
import argparse
from pathlib import Path

import pytest
import torch

from util import checkpoint, flags


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
    flags.add_save_flags(parser, 20)
    args = parser.parse_args([])
    assert (args.save_freq, args.save_last_freq) == (20, 1)
    flags.check_save_flags(args)
    for given in (['--save_freq', '0'], ['--save_last_freq', '0']):
        with pytest.raises(SystemExit, match='at least 1'):
            flags.check_save_flags(parser.parse_args(given))


def test_write_text_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    from util.checkpoint import write_text_atomic
    path = tmp_path / 'results.json'
    write_text_atomic(path, 'old')
    write_text_atomic(path, 'new')
    assert path.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['results.json']


def test_start_run_folder_continuing_sets_aside_what_the_run_redoes(tmp_path, capsys):
    import json
    log = tmp_path / 'log.txt'
    lines = [{'epoch': e, 'train_loss': 1.0} for e in range(6)] + [{'mode': 'eval', 'test_acc1': 5.0}]
    log.write_text(''.join(json.dumps(line) + '\n' for line in lines) + 'not json\n')
    for epoch in (0, 2, 4):
        torch.save({'epoch': epoch}, tmp_path / f'checkpoint-{epoch}.pth')
    torch.save({'epoch': 5}, tmp_path / 'checkpoint-last.pth')
    torch.save({'epoch': 4}, tmp_path / 'checkpoint-best.pth')  # the best of the abandoned epochs
    # an explicit --resume of epoch 2's checkpoint: epochs 3.. are redone
    assert checkpoint.start_run_folder(str(tmp_path), str(tmp_path), 3, tmp_path / 'checkpoint-2.pth',
                                       keep=(tmp_path / 'checkpoint-2.pth',))
    kept = log.read_text().splitlines()
    assert [json.loads(line).get('epoch') for line in kept[:-1]] == [0, 1, 2, None] and kept[-1] == 'not json'
    aside = next(tmp_path.glob('previous-*'))
    assert sorted(p.name for p in aside.iterdir()) == ['checkpoint-4.pth', 'checkpoint-best.pth',
                                                       'checkpoint-last.pth', 'log.txt']
    assert [json.loads(line)['epoch'] for line in (aside / 'log.txt').read_text().splitlines()] == [3, 4, 5]
    assert checkpoint.newest_checkpoint(tmp_path).name == 'checkpoint-2.pth'  # not the abandoned epoch 5
    assert 'this run redoes them' in capsys.readouterr().out
    # resuming the newest checkpoint with nothing past it: nothing to set aside
    assert checkpoint.start_run_folder(str(tmp_path), str(tmp_path), 3, tmp_path / 'checkpoint-2.pth')
    assert len(list(tmp_path.glob('previous-*'))) == 1 and capsys.readouterr().out == ''


def test_start_run_folder_of_a_fresh_run_moves_the_earlier_runs_files_aside(tmp_path, capsys):
    out, tb = tmp_path / 'out', tmp_path / 'tb'
    out.mkdir()
    tb.mkdir()
    for name in ('checkpoint-5.pth', 'checkpoint-best.pth', 'log.txt', 'freezeout_schedule.json',
                 'cli_logs.txt', 'checkpoint-9.pth'):
        (out / name).write_text(name)
    (tb / 'events.out.tfevents.1.host').write_text('events')
    torch.save({'epoch': 5}, out / 'checkpoint-last.pth')
    assert checkpoint.newest_checkpoint(out) is not None
    # fresh, fine-tuning the encoder checkpoint-9.pth that lies in this very folder: it stays
    assert not checkpoint.start_run_folder(str(out), str(tb), 0, None, keep=(None, out / 'checkpoint-9.pth'))
    moved = list(out.glob('previous-*'))
    assert len(moved) == 1 and sorted(p.name for p in moved[0].iterdir()) == [
        'checkpoint-5.pth', 'checkpoint-best.pth', 'checkpoint-last.pth', 'freezeout_schedule.json', 'log.txt']
    assert [p.name for p in (next(tb.glob('previous-*'))).iterdir()] == ['events.out.tfevents.1.host']
    # what the new run writes itself, or record.sh appends to, stays
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ['checkpoint-9.pth', 'cli_logs.txt']
    printed = capsys.readouterr().out  # one note per folder, each naming its own
    assert f'note: {out} held checkpoint-5.pth, ' in printed and f'moved to {moved[0]}/' in printed
    assert f'note: {tb} held events.out.tfevents.1.host of an earlier run; this run starts afresh' in printed
    (out / 'checkpoint-9.pth').unlink()
    assert checkpoint.newest_checkpoint(out) is None  # a later auto-resume finds only the new run's
    assert not checkpoint.start_run_folder(str(out), str(tb), 0, None)  # an empty folder: nothing to do
    assert len(list(out.glob('previous-*'))) == 1 and capsys.readouterr().out == ''
    # another fresh start within the same second: a folder of its own, nothing overwritten
    (out / 'log.txt').write_text('second run')
    checkpoint.start_run_folder(str(out), str(tb), 0, None)
    assert sorted((p / 'log.txt').read_text() for p in out.glob('previous-*')) == ['log.txt', 'second run']


def test_start_run_folder_resumed_from_another_folder_is_a_fresh_start_here(tmp_path):
    other, out = tmp_path / 'other', tmp_path / 'out'
    other.mkdir()
    out.mkdir()
    torch.save({'epoch': 1}, other / 'checkpoint-1.pth')
    (out / 'log.txt').write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')
    torch.save({'epoch': 5}, out / 'checkpoint-5.pth')
    assert not checkpoint.start_run_folder(str(out), str(out), 2, other / 'checkpoint-1.pth',
                                           keep=(other / 'checkpoint-1.pth',))
    assert sorted(p.name for p in next(out.glob('previous-*')).iterdir()) == ['checkpoint-5.pth', 'log.txt']
    assert (other / 'checkpoint-1.pth').is_file() and not (out / 'log.txt').exists()


def test_interrupted_message_says_how_to_continue(tmp_path):
    import argparse

    from util.runtime import resume_hint
    args = argparse.Namespace(output_dir=str(tmp_path), resume='', auto_resume=True)
    assert resume_hint(args) == '; no checkpoint was saved yet: the same command starts again'
    torch.save({'epoch': 3}, tmp_path / 'checkpoint-last.pth')
    assert resume_hint(args) == f'; the same command resumes from {tmp_path / "checkpoint-last.pth"}'
    args.auto_resume = False
    assert 'rerun without --no_auto_resume' in resume_hint(args)
    args.resume = 'a/checkpoint-1.pth'  # the same command would start from there again
    assert resume_hint(args) == f'; to continue from the newest checkpoint saved, rerun with --resume ' \
                                f'{tmp_path / "checkpoint-last.pth"}'
    args.eval = True
    assert resume_hint(args) == ''
    assert resume_hint(argparse.Namespace(output_dir=None)) == ''


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
    import subprocess
    import sys
    folder = str(tmp_path.resolve())
    checkpoint.lock_run_folder(folder, None)  # this process now trains into tmp_path
    checkpoint.lock_run_folder(folder)  # again in this process (a run after an in-process one): fine
    other_process = ('import sys; from util import checkpoint; checkpoint.lock_run_folder(sys.argv[1])')
    vit = Path(__file__).resolve().parents[1] / 'ViT'
    res = subprocess.run([sys.executable, '-c', other_process, folder], cwd=vit, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and f'another run is training into {folder} (pid ' in res.stderr, res.stderr
    checkpoint._held_locks.pop(folder).close()  # as this process's exit would
    res = subprocess.run([sys.executable, '-c', other_process, folder], cwd=vit, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr  # free again


def test_a_run_folder_that_holds_only_its_lock_is_removed_up_to_what_the_run_made(tmp_path):
    import os
    kept = tmp_path / 'existing'
    kept.mkdir()
    folder = kept / 'a' / 'b' / 'run'
    made_from = checkpoint.first_missing_folder(folder)
    assert made_from == (kept / 'a').resolve()
    folder.mkdir(parents=True)
    checkpoint.lock_run_folder(str(folder))
    checkpoint.remove_if_unused(folder, made_from, os.getpid() + 1)  # another process's exit (a forked worker)
    assert (folder / '.run.lock').is_file()
    checkpoint.remove_if_unused(folder, made_from, os.getpid())
    assert not (kept / 'a').exists() and kept.is_dir()  # what existed before the run stays
    assert str(folder.resolve()) not in checkpoint._held_locks
    checkpoint.remove_if_unused(folder, made_from, os.getpid())  # --log_dir == --output_dir: a second call
    # a folder the run wrote into stays, lock and all
    folder.mkdir(parents=True)
    checkpoint.lock_run_folder(str(folder))
    (folder / 'log.txt').write_text('{}\n')
    checkpoint.remove_if_unused(folder, made_from, os.getpid())
    assert sorted(p.name for p in folder.iterdir()) == ['.run.lock', 'log.txt']
    checkpoint._held_locks.pop(str(folder.resolve())).close()


def test_a_killed_runs_folder_is_free_at_once_though_its_forked_workers_live_on(tmp_path):
    """A run killed with SIGKILL leaves its loader workers (forked children) running for a while; they
    must not keep the folder locked."""
    import os
    import signal
    import subprocess
    import sys
    folder = str(tmp_path.resolve())
    run = ('import os, sys, time; from util import checkpoint; checkpoint.lock_run_folder(sys.argv[1])\n'
           'worker = os.fork()\n'
           'if worker == 0:\n    time.sleep(60); os._exit(0)\n'
           'print(worker, flush=True); time.sleep(60)\n')
    vit = Path(__file__).resolve().parents[1] / 'ViT'
    proc = subprocess.Popen([sys.executable, '-c', run, folder], cwd=vit, stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    second_run = [sys.executable, '-c',
                  'import sys; from util import checkpoint; checkpoint.lock_run_folder(sys.argv[1])', folder]
    try:
        res = subprocess.run(second_run, cwd=vit, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and 'another run is training into' in res.stderr, res.stderr  # the run holds it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.kill(worker, 0)  # the worker is still alive
        res = subprocess.run(second_run, cwd=vit, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    finally:
        os.kill(worker, signal.SIGKILL)


def test_an_upstream_optimizer_state_resumes_into_a_plain_run():
    """Upstream LocalMIM saves its AdamW groups as [no decay, decay] (timm's add_weight_decay,
    no 'param_names'), numbering its parameters in its model's order; a plain run here groups
    [decay, no decay]. The state is renumbered by name, so every parameter gets back its own
    moments, whatever order upstream's model registered its parameters in."""
    import models_mim
    from util.checkpoint import restore_training_state
    from util.optim import build_adamw, param_groups_weight_decay, skips_weight_decay

    torch.manual_seed(0)
    model = models_mim.build_model('MIM_vit_tiny_patch16', img_size=32)
    # "upstream": the same parameters, registered in another order (here: reversed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad][::-1]
    upstream = torch.optim.AdamW([{'params': [p for n, p in named if skips_weight_decay(n, p)], 'weight_decay': 0.0},
                                  {'params': [p for n, p in named if not skips_weight_decay(n, p)],
                                   'weight_decay': 0.05}], lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 3, 32, 32)).backward()
    upstream.step()
    ckpt = {'model': dict(named), 'optimizer': upstream.state_dict()}

    optimizer = build_adamw(param_groups_weight_decay(model, 0.05), 1e-3, torch.device('cpu'))
    optimizer.param_groups[0]['foreach'] = False  # this run's implementation choice survives the load
    restore_training_state(ckpt, 'upstream.pth', optimizer, None, 'hint')
    for group in optimizer.param_groups:
        for p in group['params']:
            assert torch.equal(optimizer.state[p]['exp_avg'], upstream.state[p]['exp_avg'])
            assert torch.equal(optimizer.state[p]['exp_avg_sq'], upstream.state[p]['exp_avg_sq'])
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.05, 0.0]
    assert all('param_names' in g for g in optimizer.param_groups) and optimizer.param_groups[0]['foreach'] is False
    # a layout that is neither ours nor upstream's still stops with the hint
    with pytest.raises(SystemExit, match='hint'):
        restore_training_state({'optimizer': {'state': {}, 'param_groups': ckpt['optimizer']['param_groups'][:1]}},
                               'x.pth', optimizer, None, 'hint')


def test_auto_resume_passes_over_a_damaged_checkpoint_last(tmp_path, capsys):
    """checkpoint-last.pth is rewritten every epoch: when it cannot be read (a bad copy, a full
    disk), auto-resume takes the newest numbered checkpoint and says so; when nothing else is
    there it stops with the read error rather than starting over."""
    (tmp_path / 'checkpoint-last.pth').write_bytes(b'PK\x03\x04 cut off')
    with pytest.raises(SystemExit, match='cannot read checkpoint'):
        checkpoint.newest_checkpoint(tmp_path)
    torch.save({'epoch': 4}, tmp_path / 'checkpoint-4.pth')
    assert checkpoint.newest_checkpoint(tmp_path) == tmp_path / 'checkpoint-4.pth'
    assert f'resuming from {tmp_path / "checkpoint-4.pth"} instead' in capsys.readouterr().out
    import argparse

    from util.runtime import resume_hint  # the interruption message names it, without the note
    assert resume_hint(argparse.Namespace(output_dir=str(tmp_path), resume='', auto_resume=True)) == \
        f'; the same command resumes from {tmp_path / "checkpoint-4.pth"}'
    assert capsys.readouterr().out == ''
    torch.save({'epoch': 6}, tmp_path / 'checkpoint-last.pth')  # readable again: the newest wins
    assert checkpoint.newest_checkpoint(tmp_path) == tmp_path / 'checkpoint-last.pth'



def test_auto_resume_passes_over_damaged_numbered_checkpoints(tmp_path, capsys):
    """A damaged checkpoint-<N>.pth newer than every readable file (a copy cut short, a
    --save_last_freq above --save_freq) is passed over too, newest first, each with a note."""
    torch.save({'epoch': 3}, tmp_path / 'checkpoint-last.pth')
    torch.save({'epoch': 2}, tmp_path / 'checkpoint-2.pth')
    good = (tmp_path / 'checkpoint-2.pth').read_bytes()
    for epoch in (5, 9):
        (tmp_path / f'checkpoint-{epoch}.pth').write_bytes(good[:len(good) // 2])
    assert checkpoint.newest_checkpoint(tmp_path) == tmp_path / 'checkpoint-last.pth'
    notes = capsys.readouterr().out.splitlines()
    assert [n.split('checkpoint ')[1].split(' ')[0] for n in notes] == [
        str(tmp_path / 'checkpoint-9.pth'), str(tmp_path / 'checkpoint-5.pth')]
    assert all(n.endswith(f'resuming from {tmp_path / "checkpoint-last.pth"} instead') for n in notes)
    (tmp_path / 'checkpoint-last.pth').unlink()
    assert checkpoint.newest_checkpoint(tmp_path) == tmp_path / 'checkpoint-2.pth'
    for epoch in (2, 5):  # nothing readable: the newest file's error, not a fresh start
        (tmp_path / f'checkpoint-{epoch}.pth').write_bytes(b'')
    with pytest.raises(SystemExit, match='checkpoint-9.pth'):
        checkpoint.newest_checkpoint(tmp_path)
    torch.save({'model': {}}, tmp_path / 'checkpoint-7.pth')  # readable, no epoch: the name's epoch
    assert checkpoint.newest_checkpoint(tmp_path, resuming=False) == tmp_path / 'checkpoint-7.pth'


def test_unreadable_checkpoints_say_what_is_wrong(tmp_path):
    import fractions
    (tmp_path / 'notes.pth').write_bytes(b'epoch 3, loss 0.16\n')
    torch.save({'model': {'w': torch.ones(1000)}}, tmp_path / 'full.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'full.pth').read_bytes()[:300])
    torch.save({'model': fractions.Fraction(1, 3)}, tmp_path / 'object.pth')  # not weights-only loadable
    expected = {'notes.pth': 'not a file written by torch.save', 'cut.pth': r'damaged\): RuntimeError: \S',
                'object.pth': 'it pickles Python objects other than tensors and containers'}
    for name, message in expected.items():
        with pytest.raises(SystemExit, match=message) as e:
            checkpoint.load(tmp_path / name)
        assert str(e.value).startswith(f'error: cannot read checkpoint {tmp_path / name}')
    assert checkpoint.load(tmp_path / 'full.pth')['model']['w'].shape == (1000,)


def test_resume_note_covers_the_input_pipeline_and_augmentation_flags():
    """A resume that switches how images are made (pretraining: backend, resampling, cache side;
    fine-tuning: augmentation, clipping) is named in the note, as other run-changing flags are;
    so is --blr itself, not only the lr it gives."""
    import run_finetune
    import run_pretrain

    saved = vars(run_pretrain.get_args_parser().parse_args([]))
    now = run_pretrain.get_args_parser().parse_args(['--data_backend', 'gpu-cache', '--gpu_resample', 'pil',
                                                     '--cache_size', '160', '--blr', '2e-3', '--data_path', '/b'])
    assert checkpoint.changed_flags({**saved, 'data_path': '/a'}, now, run_pretrain.RESUME_FLAGS) == [
        '--blr 0.002 (checkpoint: 0.001)', '--data_backend gpu-cache (checkpoint: pil)',
        '--gpu_resample pil (checkpoint: bicubic)',
        '--cache_size 160 (checkpoint: None)', '--data_path /b (checkpoint: /a)']
    saved = vars(run_finetune.get_args_parser().parse_args([]))
    now = run_finetune.get_args_parser().parse_args(['--aa', 'rand-m7-mstd0.5', '--reprob', '0', '--clip_grad', '1',
                                                     '--data_path', '/b'])
    assert checkpoint.changed_flags({**saved, 'data_path': '/a'}, now, run_finetune.RESUME_FLAGS) == [
        '--aa rand-m7-mstd0.5 (checkpoint: rand-m9-mstd0.5-inc1)', '--reprob 0.0 (checkpoint: 0.25)',
        '--clip_grad 1.0 (checkpoint: None)', '--data_path /b (checkpoint: /a)']
    assert checkpoint.changed_flags({'data_path': '/b/'}, now, ('data_path',)) == []  # the same folder


def test_a_full_disk_while_saving_is_enospc_and_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk or quota as RuntimeError('unexpected pos ...'), without
    an errno: save_atomic raises ENOSPC naming the file, removes its partial file, and leaves the
    previous checkpoint as it was; so for another write error with little left on the device. Other
    errors stand, also when the device cannot be asked (the folder is gone)."""
    import errno
    import shutil
    path = tmp_path / 'checkpoint-last.pth'
    checkpoint.save_atomic({'epoch': 0}, path)

    def failing_write(message):
        def write(obj, f):
            Path(f).write_bytes(b'partial')
            raise RuntimeError(message)
        return write
    torn = '[enforce fail at inline_container.cc:672] . unexpected pos 46910720 vs 46910608'
    usage = shutil.disk_usage(tmp_path)
    for message, free in ((torn, 100 << 30), ('some write error', 1 << 20)):  # a quota; a full device
        monkeypatch.setattr(checkpoint.torch, 'save', failing_write(message))
        monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda p: usage._replace(free=free))
        with pytest.raises(OSError) as e:
            checkpoint.save_atomic({'epoch': 1}, path)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-last.pth']
        assert torch.load(path, weights_only=True)['epoch'] == 0
    monkeypatch.setattr(checkpoint.torch, 'save', failing_write('some write error'))
    monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda p: usage._replace(free=100 << 30))
    with pytest.raises(RuntimeError, match='some write error'):
        checkpoint.save_atomic({'epoch': 1}, path)

    def gone(p):
        raise FileNotFoundError(2, 'No such file or directory', str(p))
    monkeypatch.setattr(checkpoint.shutil, 'disk_usage', gone)
    with pytest.raises(RuntimeError, match='some write error'):
        checkpoint.save_atomic({'epoch': 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-last.pth']
