"""End-to-end runs of ViT/run_pretrain.py on a tiny real-photo ImageFolder (CPU, one process):
outputs, FreezeOut schedule and frozen weights, bit-exact resume, clear errors, flags, layouts."""
from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from helpers import (BATCH, NUM_IMAGES, VIT, args_line, assert_same_optimizer_state, assert_same_tensors,
                     ceil_steps, expected_fractions, frozen_at, keys_of_prefixes, load_ckpt,
                     make_demo_data, read_log, read_schedule, run_ok, run_pretrain)

STEPS_PER_EPOCH = NUM_IMAGES // BATCH  # 8
TINY_LAYERS = 13  # patch embedding + 12 blocks


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    return make_demo_data(tmp_path_factory.getbasetemp())


# ---- 1. plain run ---------------------------------------------------------------------------
@pytest.fixture(scope='session')
def plain_run(data, tmp_path_factory):
    """2 epochs, --data_path <root> (upstream's layout), 0 workers; reused by tests 1, 3b and 6."""
    base = tmp_path_factory.mktemp('plain')
    out, tb = base / 'out', base / 'tb'
    res = run_ok('--data_path', data, '--output_dir', out, '--log_dir', tb,
                 '--epochs', '2', '--save_freq', '1')
    return res, out, tb


def test_plain_run_writes_checkpoints_log_and_tensorboard(plain_run):
    res, out, tb = plain_run

    names = sorted(p.name for p in out.iterdir())
    for name in ('checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth', 'log.txt'):
        assert name in names, names
    assert 'checkpoint-2.pth' not in names
    assert not [n for n in names if n.endswith('.tmp')], names  # atomic saves leave nothing behind

    log = read_log(out)
    assert [r['epoch'] for r in log] == [0, 1]
    for r in log:
        assert math.isfinite(r['train_loss']) and r['train_loss'] > 0
        assert r['train_epoch_time'] > 0
        assert r['train_frozen_layers'] == 0

    events = list(tb.glob('events.out.tfevents.*'))
    assert events, f'no tensorboard file in --log_dir {tb}: {list(tb.iterdir())}'
    assert not list(out.glob('events.out.tfevents.*')), 'tensorboard ignored --log_dir'
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = acc.Tags()['scalars']
    assert 'train_loss' in scalars and 'lr' in scalars, scalars
    # print_freq 2, 8 iterations per epoch, 2 epochs
    assert len(acc.Scalars('train_loss')) == 2 * STEPS_PER_EPOCH // 2

    ckpts = {n: load_ckpt(out / n) for n in ('checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth')}
    for name, ck in ckpts.items():
        assert {'model', 'optimizer', 'epoch', 'args'} <= ck.keys(), (name, ck.keys())
        assert isinstance(ck['args'], dict)
        assert ck['args']['model'] == 'MIM_vit_tiny_patch16' and ck['args']['epochs'] == 2
        assert 'patch_embed.proj.weight' in ck['model']
        assert ck['model']['patch_embed.proj.weight'].shape == (192, 3, 16, 16)
    assert ckpts['checkpoint-0.pth']['epoch'] == 0
    assert ckpts['checkpoint-1.pth']['epoch'] == ckpts['checkpoint-last.pth']['epoch'] == 1
    assert_same_tensors(ckpts['checkpoint-1.pth']['model'], ckpts['checkpoint-last.pth']['model'], 'last vs 1')
    assert not torch.equal(ckpts['checkpoint-0.pth']['model']['blocks.0.attn.qkv.weight'],
                           ckpts['checkpoint-1.pth']['model']['blocks.0.attn.qkv.weight']), 'no training?'
    assert 'resumed from' not in res.stdout

    # train_lr: the mean over the epoch's steps of the lr each trained with, as upstream's meter
    from util.lr_sched import PlainSchedule
    a = ckpts['checkpoint-last.pth']['args']
    sched = PlainSchedule(None, a['lr'], a['min_lr'], a['warmup_epochs'], a['epochs'], STEPS_PER_EPOCH)
    for r in log:
        steps = range(r['epoch'] * STEPS_PER_EPOCH, (r['epoch'] + 1) * STEPS_PER_EPOCH)
        assert r['train_lr'] == pytest.approx(sum(sched.lr_at(s) for s in steps) / STEPS_PER_EPOCH, rel=1e-9)


# ---- 2. FreezeOut run -----------------------------------------------------------------------
def test_freezeout_run_schedule_and_frozen_weights(data, tmp_path):
    out = tmp_path / 'out'
    epochs = 4
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', str(epochs), '--save_freq', '1',
                 '--t_0', '0.5', '--how_scale', 'linear')
    total = epochs * STEPS_PER_EPOCH

    sched = read_schedule(out)
    assert sched['total_steps'] == total
    rows = sched['layers']
    assert [r['index'] for r in rows] == list(range(TINY_LAYERS))
    for r, t in zip(rows, expected_fractions(TINY_LAYERS, 0.5, 'linear')):
        assert r['t'] == pytest.approx(t, rel=1e-12)
        assert r['freeze_step'] == ceil_steps(t, total), r
    assert rows[-1]['freeze_step'] == total  # the last block trains to the end

    log = read_log(out)
    assert [r['epoch'] for r in log] == list(range(epochs))
    final_frozen = frozen_at(sched, total - 1)
    assert log[-1]['train_frozen_layers'] == final_frozen > 0
    assert log[0]['train_frozen_layers'] == 0

    # every freeze event is announced once, at its step
    events = sorted({r['freeze_step'] for r in rows if r['freeze_step'] < total})
    announced = [int(line.split()[2].rstrip(':')) for line in res.stdout.splitlines()
                 if line.startswith('FreezeOut: step')]
    assert announced == events
    # each epoch's closing line counts epochs and, before the last, estimates the time left
    closing = [line for line in res.stdout.splitlines() if ' done in ' in line]
    assert [line.split(']')[0] for line in closing] == [f'Epoch [{e}' for e in range(epochs)], closing
    assert all(re.search(rf'; {e + 1} of {epochs} epochs done, run eta \d+:\d\d:\d\d$', line)
               for e, line in enumerate(closing[:-1])), closing
    assert closing[-1].endswith(f'; {epochs} of {epochs} epochs done'), closing

    # layers frozen during epoch 2 stay bitwise equal to the end; the rest keeps training
    ck = {e: load_ckpt(out / f'checkpoint-{e}.pth') for e in (0, 2, 3)}
    frozen_by_2 = frozen_at(sched, 3 * STEPS_PER_EPOCH - 1)
    assert 2 <= frozen_by_2 < final_frozen
    frozen_prefixes = [p for r in rows[:frozen_by_2] for p in r['params']]
    frozen_keys = keys_of_prefixes(ck[3]['model'], frozen_prefixes)
    assert 'patch_embed.proj.weight' in frozen_keys and 'blocks.0.attn.qkv.weight' in frozen_keys
    assert 'cls_token' in frozen_keys
    for k in frozen_keys:
        assert torch.equal(ck[2]['model'][k], ck[3]['model'][k]), f'{k} changed after it was frozen'
    # ... and they did train before freezing
    assert not torch.equal(ck[0]['model']['blocks.0.attn.qkv.weight'], ck[2]['model']['blocks.0.attn.qkv.weight'])
    live_keys = keys_of_prefixes(ck[3]['model'], rows[-1]['params'])  # blocks.11, last tap
    assert 'blocks.11.attn.qkv.weight' in live_keys
    assert any(not torch.equal(ck[2]['model'][k], ck[3]['model'][k]) for k in live_keys)

    # frozen parameters have no optimizer state (Adam moments freed), trainable ones do
    opt = ck[3]['optimizer']
    for g in opt['param_groups']:
        for idx, name in zip(g['params'], g['param_names']):
            if g['layer'] < final_frozen:
                assert idx not in opt['state'], f'{name} is frozen but keeps optimizer state'
            elif name.startswith('blocks.11.'):
                assert idx in opt['state'], f'{name} trains but has no optimizer state'


# ---- 3. resume is bit-exact -----------------------------------------------------------------
@pytest.mark.parametrize('kind, extra, workers, explicit_resume', [
    ('plain', [], 0, True),
    ('freezeout', ['--t_0', '0.5', '--how_scale', 'linear'], 2, False),
], ids=['plain-workers0-resume-flag', 'freezeout-workers2-auto-resume'])
def test_resume_is_bitwise_equal_to_uninterrupted_run(data, tmp_path, kind, extra, workers, explicit_resume):
    flags = ['--data_path', data, '--epochs', '3', '--save_freq', '1', '--num_workers', str(workers), *extra]
    a, c = tmp_path / 'A', tmp_path / 'C'
    run_ok(*flags, '--output_dir', a)

    if kind == 'freezeout':  # the resume point (epoch 2 = step 16) is in the middle of the freezing
        sched = read_schedule(a)
        resume_step, total = 2 * STEPS_PER_EPOCH, sched['total_steps']
        assert 0 < frozen_at(sched, resume_step) < frozen_at(sched, total - 1)
        assert frozen_at(sched, resume_step - 1) > 0  # the checkpoint itself was saved with frozen layers

    c.mkdir()
    shutil.copy2(a / 'checkpoint-1.pth', c / 'checkpoint-1.pth')
    resume = ['--resume', c / 'checkpoint-1.pth'] if explicit_resume else []  # else: auto-resume from C
    res = run_ok(*flags, '--output_dir', c, *resume)
    assert 'resumed from' in res.stdout and 'checkpoint-1.pth' in res.stdout, res.stdout[-3000:]
    assert 'continuing at epoch 2' in res.stdout

    ck_a, ck_c = load_ckpt(a / 'checkpoint-last.pth'), load_ckpt(c / 'checkpoint-last.pth')
    assert ck_a['epoch'] == ck_c['epoch'] == 2
    assert_same_tensors(ck_a['model'], ck_c['model'], f'{kind}: model after resume')
    assert_same_optimizer_state(ck_a['optimizer'], ck_c['optimizer'], f'{kind}: optimizer after resume')
    # the resumed run did train epoch 2 (and only epoch 2)
    assert not torch.equal(load_ckpt(c / 'checkpoint-1.pth')['model']['blocks.11.attn.qkv.weight'],
                           ck_c['model']['blocks.11.attn.qkv.weight'])
    log_a, log_c = read_log(a), read_log(c)
    assert [r['epoch'] for r in log_c] == [2]
    assert log_c[0]['train_loss'] == log_a[2]['train_loss']
    assert log_c[0]['train_frozen_layers'] == log_a[2]['train_frozen_layers']


def test_resume_at_the_last_freeze_event_frees_the_freezing_layers_optimizer_state(data, tmp_path):
    """The checkpoint saved just before a freeze event still holds the Adam moments of the layer
    that freezes at the resume step; the resumed run frees them as the uninterrupted run does,
    even when no later freeze event would (here the resume is at the last one)."""
    batch = 16
    flags = ['--data_path', data, '--epochs', '6', '--batch_size', str(batch), '--warmup_epochs', '0',
             '--t_0', '0.2', '--how_scale', 'cubic', '--save_freq', '1']
    a, c = tmp_path / 'A', tmp_path / 'C'
    run_ok(*flags, '--output_dir', a)
    sched, steps_per_epoch = read_schedule(a), NUM_IMAGES // batch
    last_event = max(r['freeze_step'] for r in sched['layers'] if r['freeze_step'] < sched['total_steps'])
    resume_epoch = last_event // steps_per_epoch
    assert last_event == resume_epoch * steps_per_epoch and 0 < resume_epoch < 6, (last_event, steps_per_epoch)

    c.mkdir()
    shutil.copy2(a / f'checkpoint-{resume_epoch - 1}.pth', c)
    res = run_ok(*flags, '--output_dir', c)
    # the console says what the resume step has frozen (no freeze line is printed for that step)
    assert (f'continuing at epoch {resume_epoch} with {frozen_at(sched, last_event)} layers frozen'
            in res.stdout), res.stdout[-3000:]
    ck_a, ck_c = load_ckpt(a / 'checkpoint-last.pth'), load_ckpt(c / 'checkpoint-last.pth')
    assert_same_tensors(ck_a['model'], ck_c['model'], 'model after a resume at the last freeze event')
    assert_same_optimizer_state(ck_a['optimizer'], ck_c['optimizer'],
                                'optimizer after a resume at the last freeze event')


def test_result_does_not_depend_on_num_workers(data, plain_run, tmp_path):
    """Augmentations are seeded per (seed, epoch, index) and the loader does not touch the
    global RNG that draws the masks, so 0 and 2 (persistent) workers train the same weights."""
    _, out0, _ = plain_run
    run_ok('--data_path', data, '--output_dir', tmp_path / 'w2', '--epochs', '2', '--num_workers', '2')
    assert_same_tensors(load_ckpt(out0 / 'checkpoint-last.pth')['model'],
                        load_ckpt(tmp_path / 'w2' / 'checkpoint-last.pth')['model'], 'workers 0 vs 2')


# ---- 4. bad input: a clear message, a non-zero exit, no traceback ----------------------------
def _garbage(tmp_path):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(bytes(range(256)) * 8)
    return ['--resume', path]


def _no_model_entry(tmp_path):
    path = tmp_path / 'not_pretrain.pth'
    torch.save({'epoch': 3, 'weights': torch.zeros(2)}, path)
    return ['--resume', path]


def _empty_folder(tmp_path):
    (tmp_path / 'empty' / 'train' / 'some_class').mkdir(parents=True)
    return ['--data_path', tmp_path / 'empty']


def _truncated_jpeg(tmp_path, data):
    copy = tmp_path / 'truncated'
    shutil.copytree(data, copy)
    victim = sorted((copy / 'train').rglob('*.jpg'))[5]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    return ['--data_path', copy, '--num_workers', '1']  # the error crosses from a worker


def _bare_tensor(tmp_path):
    path = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), path)
    return ['--resume', path]


def _classifier_checkpoint(tmp_path):
    import models_vit
    path = tmp_path / 'finetuned.pth'
    model = models_vit.build_model('vit_tiny_patch16', img_size=32, num_classes=4)
    torch.save({'model': model.state_dict(), 'epoch': 0, 'args': {'model': 'vit_tiny_patch16'}}, path)
    return ['--resume', path]


def _under_a_file(tmp_path):
    (tmp_path / 'a_file').write_text('')
    return ['--output_dir', tmp_path / 'a_file' / 'out']


BAD_INPUTS = {
    'missing-data-path': (lambda tmp, data: [], 'does not exist'),  # default ./dataset/ImageNet/
    'empty-data-folder': (lambda tmp, data: _empty_folder(tmp), 'no class folders'),
    'unknown-model': (lambda tmp, data: ['--data_path', data, '--model', 'MIM_vit_nope'], 'unknown --model'),
    'garbage-checkpoint': (lambda tmp, data: ['--data_path', data, *_garbage(tmp)], 'cannot read checkpoint'),
    'checkpoint-without-model': (lambda tmp, data: ['--data_path', data, *_no_model_entry(tmp)], '"model"'),
    't0-above-one': (lambda tmp, data: ['--data_path', data, '--t_0', '1.5'], '--t_0'),
    't0-freeze-in-warmup': (lambda tmp, data: ['--data_path', data, '--epochs', '10', '--warmup_epochs', '5',
                                               '--t_0', '0.5', '--how_scale', 'cubic'], 'warmup'),
    'cuda-without-gpu': (lambda tmp, data: ['--data_path', data, '--device', 'cuda'], 'no cuda gpu'),
    'mask-ratio-zero': (lambda tmp, data: ['--data_path', data, '--mask_ratio', '0'], '--mask_ratio'),
    'save-freq-zero': (lambda tmp, data: ['--data_path', data, '--save_freq', '0'], '--save_freq'),
    'decode-ahead-negative': (lambda tmp, data: ['--data_path', data, '--decode_ahead', '-1'], '--decode_ahead'),
    'truncated-jpeg': (lambda tmp, data: _truncated_jpeg(tmp, data), 'cannot decode '),
    'input-size-not-a-multiple': (lambda tmp, data: ['--data_path', data, '--input_size', '40'], 'not a multiple'),
    'freezeout-flags-without-t0': (lambda tmp, data: ['--data_path', data, '--how_scale', 'linear'], 'without --t_0'),
    'start-epoch-past-a-freeze': (lambda tmp, data: ['--data_path', data, '--epochs', '4', '--warmup_epochs', '1',
                                                     '--t_0', '0.5', '--how_scale', 'linear', '--start_epoch', '3'],
                                  'would keep their random init'),
    'output-dir-under-a-file': (lambda tmp, data: ['--data_path', data, *_under_a_file(tmp)],
                                'cannot create --output_dir'),
    'bare-tensor-checkpoint': (lambda tmp, data: ['--data_path', data, *_bare_tensor(tmp)], 'not a checkpoint dict'),
    'classifier-checkpoint': (lambda tmp, data: ['--data_path', data, *_classifier_checkpoint(tmp)],
                              'classifier checkpoint'),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_gives_clear_error(data, tmp_path, case):
    make_flags, fragment = BAD_INPUTS[case]
    if case == 'missing-data-path' and (VIT / 'dataset' / 'ImageNet').exists():
        pytest.skip('the default --data_path ./dataset/ImageNet/ exists in this checkout')
    out = tmp_path / 'out'
    # flags come last: argparse keeps the last --epochs / --device / --model given
    res = run_pretrain('--epochs', '2', '--output_dir', out, *make_flags(tmp_path, data), timeout=120)
    assert res.returncode != 0, res.describe()
    assert 'Traceback' not in res.output, res.describe()
    assert 'error' in res.stderr.lower(), res.describe()
    assert fragment.lower() in res.stderr.lower(), res.describe()
    assert not (out.exists() and list(out.glob('checkpoint-*.pth'))), 'a failed run wrote checkpoints'
    assert 'flags that differ' not in res.stdout, res.describe()  # e.g. a classifier's --model: noise here
    # the folder this run made is gone again when it wrote nothing there (it used to keep its .run.lock)
    assert not out.exists() or [p.name for p in out.iterdir()] != ['.run.lock'], case


def test_a_fresh_start_epoch_before_any_freeze_trains_the_rest_with_a_note(data, tmp_path):
    res = run_ok('--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '3', '--start_epoch', '2')
    assert 'note: --start_epoch 2 with no checkpoint to resume from' in res.stdout, res.describe()
    assert 'Start training: epochs 2-2 of 3 (1 left' in res.stdout, res.describe()
    assert [r['epoch'] for r in read_log(tmp_path / 'out')] == [2]


# ---- 5. both spellings of the launcher's local-rank flag --------------------------------------
@pytest.mark.parametrize('flag', ['--local-rank', '--local_rank'])
def test_local_rank_flag_spellings(data, tmp_path, flag):
    res = run_ok('--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '1', flag, '0')
    args = args_line(res.stdout)
    assert args['local_rank'] == 0 and args['distributed'] is False
    assert [r['epoch'] for r in read_log(tmp_path / 'out')] == [0]


# ---- 6. data folder layouts -----------------------------------------------------------------
@pytest.fixture(scope='session')
def layouts(data, tmp_path_factory):
    nested = tmp_path_factory.mktemp('nested')
    shutil.copytree(data / 'train', nested / 'train' / 'image_folders')
    return {'root': (data, data / 'train'),
            'class-folders': (data / 'train', data / 'train'),
            'train-image_folders': (nested, nested / 'train' / 'image_folders')}


def test_data_path_root_layout_uses_train_split(layouts, plain_run):
    res = plain_run[0]
    path, expected = layouts['root']
    assert f'data: {expected}: {NUM_IMAGES} images' in res.stdout, res.stdout[-3000:]  # not train+val


@pytest.mark.parametrize('layout', ['class-folders', 'train-image_folders'])
def test_data_path_layouts(layouts, plain_run, tmp_path, layout):
    """The class folders themselves and <root>/train/image_folders find the same 32 training
    images as <root> and train the same weights."""
    path, expected = layouts[layout]
    res = run_ok('--data_path', path, '--output_dir', tmp_path / 'out', '--epochs', '2')
    assert f'data: {expected}: {NUM_IMAGES} images' in res.stdout, res.stdout[-3000:]
    assert_same_tensors(load_ckpt(plain_run[1] / 'checkpoint-last.pth')['model'],
                        load_ckpt(tmp_path / 'out' / 'checkpoint-last.pth')['model'], f'{layout} vs <root>')


# ---- 7. resuming with other flags -------------------------------------------------------------
@pytest.mark.parametrize('other, fragment', [
    (['--t_0', '0.5', '--how_scale', 'linear'], 'other parameter groups'),   # plain checkpoint -> FreezeOut
    (['--model', 'MIM_vit_small_patch16'], 'does not fit --model'),
])
def test_resume_with_incompatible_flags_is_a_clear_error(data, tmp_path, other, fragment):
    out = tmp_path / 'out'
    run_ok('--data_path', data, '--output_dir', out, '--epochs', '1')
    res = run_pretrain('--data_path', data, '--output_dir', out, '--epochs', '3', *other, timeout=120)
    assert res.returncode != 0, res.describe()
    assert 'Traceback' not in res.output and fragment in res.stderr, res.describe()
    assert 'no_auto_resume' in res.stderr  # says how to start afresh


def test_resume_notes_changed_flags(data, tmp_path):
    out = tmp_path / 'out'
    run_ok('--data_path', data, '--output_dir', out, '--epochs', '1')
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', '2', '--min_lr', '1e-5')
    assert 'differ from its run' in res.stdout and '--epochs 2 (checkpoint: 1)' in res.stdout
    assert [r['epoch'] for r in read_log(out)] == [0, 1]


def test_rerun_drops_lines_it_redoes_and_a_fresh_run_sets_the_earlier_one_aside(data, tmp_path):
    out = tmp_path / 'out'
    run_ok('--data_path', data, '--output_dir', out, '--epochs', '2')
    # epoch 2 trained and logged, then interrupted before its checkpoint (--save_last_freq > 1 does that)
    with open(out / 'log.txt', 'a') as f:
        f.write('{"epoch": 2, "train_loss": 9.9}\n')
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', '3')
    assert 'log.txt lines of epochs >= 2 of an earlier run; this run redoes them' in res.stdout, res.describe()
    assert [r['epoch'] for r in read_log(out)] == [0, 1, 2] and read_log(out)[2]['train_loss'] != 9.9
    redone = next(out.glob('previous-*'))
    assert read_log(redone) == [{'epoch': 2, 'train_loss': 9.9}]  # set aside, not deleted
    # a fresh run in the same folder: the earlier run's checkpoints and log.txt move aside, so the
    # rerun after it resumes the new run, not the earlier run's higher checkpoint-<N>.pth
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', '1', '--no_auto_resume')
    assert 'this run starts afresh' in res.stdout and [r['epoch'] for r in read_log(out)] == [0]
    earlier = [p for p in out.glob('previous-*') if p != redone]
    assert len(earlier) == 1 and [r['epoch'] for r in read_log(earlier[0])] == [0, 1, 2]
    assert (earlier[0] / 'checkpoint-last.pth').is_file()
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', '1')
    assert 'all 1 epochs are done' in res.stdout, res.describe()


def test_freezeout_resume_that_would_thaw_layers_is_refused(data, tmp_path):
    out = tmp_path / 'out'
    fo_flags = ['--t_0', '0.5', '--how_scale', 'linear']
    run_ok('--data_path', data, '--output_dir', out, '--epochs', '3', *fo_flags)
    saved = load_ckpt(out / 'checkpoint-last.pth')['frozen']
    assert saved['num_frozen'] == 12 and saved['live_taps'] == [3]  # at step 23 of 24
    # a finished FreezeOut run relaunched: nothing to do, and no advice to raise --epochs
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', '3', *fo_flags)
    assert 'all 3 epochs are done' in res.stdout and 'new run' in res.stdout, res.describe()
    assert 'continuing at epoch 3\n' in res.stdout and 'layers frozen' not in res.stdout, res.describe()
    # twice the epochs: the resume step (24 of 48) is before most freeze steps
    res = run_pretrain('--data_path', data, '--output_dir', out, '--epochs', '6', *fo_flags, timeout=120)
    assert res.returncode != 0 and 'Traceback' not in res.output, res.describe()
    assert 'would unfreeze layers 1..11' in res.stderr and 'dropped taps' in res.stderr, res.describe()
    assert '--no_auto_resume' in res.stderr


def test_resume_from_upstream_format_checkpoint(data, plain_run, tmp_path):
    """LocalMIM's own checkpoints pickle args as an argparse.Namespace."""
    import argparse
    _, plain_out, _ = plain_run
    ckpt = load_ckpt(plain_out / 'checkpoint-0.pth')
    ckpt['args'] = argparse.Namespace(**ckpt['args'])
    ckpt.pop('frozen', None)
    upstream = tmp_path / 'upstream.pth'
    torch.save(ckpt, upstream)
    res = run_ok('--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '2', '--resume', upstream)
    assert 'upstream format' in res.stdout and 'continuing at epoch 1' in res.stdout, res.describe()


def start_long_run(data, out):
    """A 300-epoch run with 2 loader workers in its own process group, returned once it has
    written checkpoint-last.pth (or ended)."""
    import subprocess
    import sys
    import time

    from helpers import COMMON, subprocess_env
    cmd = [sys.executable, 'run_pretrain.py', *COMMON, '--data_path', str(data), '--output_dir', str(out),
           '--epochs', '300', '--num_workers', '2']
    proc = subprocess.Popen(cmd, cwd=VIT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / 'checkpoint-last.pth').is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    return proc


def test_a_second_launch_is_refused_and_ctrl_c_ends_with_one_line_and_the_rerun_resumes(data, tmp_path):
    import os
    import signal

    out = tmp_path / 'out'
    proc = start_long_run(data, out)
    # the same command started again while this one runs: refused before it writes anything
    second = run_pretrain('--data_path', data, '--output_dir', out, '--epochs', '300', timeout=120)
    assert second.returncode != 0 and 'Traceback' not in second.output, second.describe()
    assert f'error: another run is training into {out} (pid {proc.pid} on ' in second.stderr, second.describe()
    # the lock comes before the data and the resume: nothing loaded, nothing claimed
    assert 'data: ' not in second.stdout and 'resumed from' not in second.stdout, second.describe()
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole foreground group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
    assert f'interrupted; the same command resumes from {out}/checkpoint-' in stderr, stderr[-2000:]
    done = [r['epoch'] for r in read_log(out)]
    res = run_ok('--data_path', data, '--output_dir', out, '--epochs', str(done[-1] + 2))
    epochs = [r['epoch'] for r in read_log(out)]
    assert 'resumed from' in res.stdout and epochs == sorted(set(epochs)) and epochs[-1] == done[-1] + 1


def test_sigterm_ends_with_one_line_that_says_how_to_resume(data, tmp_path):
    """SIGTERM to the whole process group (a scheduler's preemption; the loader workers get it
    too): one line with the resume hint, exit status 143, no traceback."""
    import os
    import signal

    out = tmp_path / 'out'
    proc = start_long_run(data, out)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stdout[-2000:] + stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert f'terminated (SIGTERM); the same command resumes from {out}/checkpoint-' in stderr, stderr[-2000:]
    from util.runtime import Terminated
    assert not issubclass(Terminated, Exception)  # no `except Exception` on the way can swallow it


def test_runs_that_save_nothing_or_freeze_nothing_say_so(data):
    """--t_0 1 freezes no layer within the run, and an empty --output_dir writes nothing: both
    run, with a note (no checkpoint to resume from; no time saved)."""
    res = run_ok('--data_path', data, '--output_dir', '', '--epochs', '2', '--t_0', '1.0', '--how_scale', 'linear')
    assert 'note: no --output_dir: no checkpoint, log.txt or schedule is written' in res.stdout
    assert 'note: no layer freezes within these' in res.stdout
