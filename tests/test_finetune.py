"""Fine-tuning: encoder loading (ours, upstream format, other resolution, wrong files),
layer-wise lr decay groups, data layouts, flags, and a tiny end-to-end run plus --eval."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / 'ViT'
if str(VIT) not in sys.path:
    sys.path.insert(0, str(VIT))

import models_mim  # noqa: E402
import models_vit  # noqa: E402
from helpers import run_script  # noqa: E402
from util.encoder_loading import load_pretrained_encoder  # noqa: E402
from util.lr_decay import layer_id_for_vit, param_groups_lrd  # noqa: E402
from util.pos_embed import resize_pos_embed  # noqa: E402

HEAD_GLOBAL = {'head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias'}
HEAD_CLS = {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}


def _pretrain_state(img_size: int = 32, builder=models_mim.MIM_vit_tiny_patch16) -> dict:
    torch.manual_seed(0)
    return builder(img_size=img_size).state_dict()


@pytest.fixture(scope='session')
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A pretraining checkpoint as run_pretrain.py writes it (model under 'model')."""
    path = tmp_path_factory.getbasetemp() / 'eval_pretrain_tiny32.pth'
    if not path.exists():
        torch.save({'model': _pretrain_state(), 'epoch': 0}, path)
    return path


def _tiny(global_pool: bool = True, img_size: int = 32) -> models_vit.VisionTransformer:
    return models_vit.build_model('vit_tiny_patch16', img_size=img_size, num_classes=4, global_pool=global_pool)


# ---- loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize('global_pool', [True, False])
def test_load_ours(pretrain_ckpt, global_pool):
    model = _tiny(global_pool)
    report = load_pretrained_encoder(model, pretrain_ckpt, 2e-5)
    assert set(report.missing) == (HEAD_GLOBAL if global_pool else HEAD_CLS)
    assert report.unexpected == []
    assert any(k.startswith('norm.0.') for k in report.dropped)
    assert any(k.startswith('decoder.') for k in report.dropped)
    assert any(k.startswith('hog_enc.') for k in report.dropped)
    src = torch.load(pretrain_ckpt, weights_only=True)['model']
    dst = model.state_dict()
    for k in ('patch_embed.proj.weight', 'cls_token', 'pos_embed', 'blocks.0.attn.qkv.weight',
              'blocks.11.mlp.fc2.bias', 'blocks.5.norm1.weight'):
        assert torch.equal(dst[k], src[k]), k
    assert report.head_initialised
    assert 0 < model.head.weight.std() < 1e-4  # trunc_normal std 2e-5
    assert torch.count_nonzero(model.head.bias) == 0


def test_load_upstream_format(tmp_path):
    """LocalMIM's released files: same keys, plus entries such as 'args' (a dict here, a pickled
    Namespace in the releases) and 'optimizer'."""
    state = _pretrain_state()
    for i, args in enumerate([{'model': 'MIM_vit_tiny_patch16', 'input_size': 32},
                              argparse.Namespace(model='MIM_vit_tiny_patch16', input_size=32)]):
        path = tmp_path / f'upstream{i}.pth'
        torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 1599,
                    'scaler': {}, 'args': args}, path)
        model = _tiny(global_pool=True)
        report = load_pretrained_encoder(model, path, 2e-5)
        assert set(report.missing) == HEAD_GLOBAL and report.unexpected == []
        assert torch.equal(model.state_dict()['blocks.3.attn.proj.weight'], state['blocks.3.attn.proj.weight'])


def test_load_fine_tuned_checkpoint_into_headless_model(tmp_path, capsys):
    """kNN builds its encoder with num_classes=0 (no head) and may be given a fine-tuned file."""
    tuned = _tiny(global_pool=True)
    path = tmp_path / 'finetuned.pth'
    torch.save({'model': tuned.state_dict(), 'epoch': 9}, path)
    headless = models_vit.build_model('vit_tiny_patch16', img_size=32, num_classes=0, global_pool=True)
    load_pretrained_encoder(headless, path, 2e-5, 'vit_tiny_patch16')
    said = capsys.readouterr().out
    assert 'only the encoder is used' in said and 'initialised afresh' not in said, said
    assert torch.equal(headless.state_dict()['blocks.2.mlp.fc1.weight'], tuned.state_dict()['blocks.2.mlp.fc1.weight'])
    # fine-tuning again from it (--finetune, not --resume): a new head, as upstream
    again = _tiny(global_pool=True)
    report = load_pretrained_encoder(again, path, 2e-5, 'vit_tiny_patch16')
    assert report.head_initialised and 0 < again.head.weight.std() < 1e-4
    assert 'the head is initialised afresh' in capsys.readouterr().out
    assert torch.equal(again.fc_norm.weight, tuned.fc_norm.weight)


def test_restoring_an_optimizer_state_of_other_groups_is_a_clear_error(tmp_path):
    from util import checkpoint
    model = _tiny()
    two_groups = torch.optim.AdamW([{'params': [model.head.weight]}, {'params': [model.head.bias]}])
    one_group = torch.optim.AdamW([{'params': [model.head.weight, model.head.bias]}])
    ckpt = {'optimizer': two_groups.state_dict(), 'rng': [checkpoint.rng_state()] * 3}
    with pytest.raises(SystemExit, match='other parameter groups .*: use the right flags') as info:
        checkpoint.restore_training_state(ckpt, tmp_path / 'x.pth', one_group, None, 'use the right flags')
    assert str(info.value.code).startswith('error: ')
    del ckpt['optimizer']
    checkpoint.restore_training_state(ckpt, tmp_path / 'x.pth', one_group, None, '')  # 3 ranks' RNG, 1 now: a note


def test_load_other_resolution_interpolates_pos_embed(pretrain_ckpt):
    model = _tiny(global_pool=True, img_size=64)  # 4x4 tokens; checkpoint has 2x2
    report = load_pretrained_encoder(model, pretrain_ckpt, 2e-5)
    assert report.pos_embed_resized == (2, 4)
    src = torch.load(pretrain_ckpt, weights_only=True)['model']['pos_embed']
    assert model.pos_embed.shape == (1, 17, 192)
    assert torch.allclose(model.pos_embed.data, resize_pos_embed(src, 1, 4))
    assert torch.equal(model.pos_embed.data[:, 0], src[:, 0])  # cls entry untouched
    assert set(report.missing) == HEAD_GLOBAL


def _resnet_like() -> dict:
    return {'conv1.weight': torch.zeros(64, 3, 7, 7), 'bn1.weight': torch.ones(64), 'fc.weight': torch.zeros(10, 512)}


@pytest.mark.parametrize('kind, phrase', [
    ('garbage', 'cannot read checkpoint'),
    ('no_model', 'no "model" entry'),
    ('bare_resnet', 'no "model" entry'),
    ('resnet', 'not a ViT encoder checkpoint'),
    ('wrong_width', 'width 384'),
    ('wrong_width_recorded', 'use --model vit_small_patch16 (the checkpoint was pretrained as MIM_vit_small_patch16)'),
    ('wrong_depth_recorded', 'use --model vit_small_patch16 (the checkpoint was pretrained as MIM_vit_small_patch16)'),
    ('missing_blocks', 'blocks'),
    ('not_a_dict', 'not a checkpoint dict'),
    ('empty', 'is empty (0 bytes)'),
])
def test_wrong_files_are_refused(tmp_path, kind, phrase):
    path = tmp_path / f'{kind}.pth'
    if kind == 'garbage':
        path.write_bytes(os.urandom(2048))
    elif kind == 'no_model':
        torch.save({'state_dict': _pretrain_state(), 'epoch': 3}, path)
    elif kind == 'bare_resnet':
        torch.save(_resnet_like(), path)
    elif kind == 'resnet':
        torch.save({'model': _resnet_like(), 'epoch': 0}, path)
    elif kind == 'wrong_width':
        torch.save({'model': _pretrain_state(builder=models_mim.MIM_vit_small_patch16)}, path)
    elif kind == 'wrong_width_recorded':  # the checkpoint's args say which model it was
        torch.save({'model': _pretrain_state(builder=models_mim.MIM_vit_small_patch16),
                    'args': {'model': 'MIM_vit_small_patch16'}}, path)
    elif kind == 'wrong_depth_recorded':
        state = {k: v for k, v in _pretrain_state().items() if not k.startswith('blocks.11.')}
        torch.save({'model': state, 'args': {'model': 'MIM_vit_small_patch16'}}, path)
    elif kind == 'missing_blocks':
        state = {k: v for k, v in _pretrain_state().items() if not k.startswith('blocks.11.')}
        torch.save({'model': state}, path)
    elif kind == 'not_a_dict':
        torch.save([torch.zeros(3)], path)
    elif kind == 'empty':
        path.write_bytes(b'')
    with pytest.raises(SystemExit) as info:
        load_pretrained_encoder(_tiny(), path, 2e-5, 'vit_tiny_patch16')
    message = str(info.value.code)
    assert message.startswith('error: ') and phrase in message, message


def _probe_model() -> torch.nn.Module:
    import run_linprobe
    return run_linprobe.build_probe(argparse.Namespace(model='vit_tiny_patch16', input_size=32, nb_classes=4,
                                                       global_pool=False, finetune='', eval=True))


def test_a_checkpoint_of_another_script_is_named_as_such(tmp_path):
    """Before: a list of missing keys and advice about --global_pool that did not help."""
    from run_finetune import check_written_by_this_script
    from util.encoder_loading import written_by
    states = {'run_pretrain.py': _pretrain_state(), 'run_finetune.py': _tiny().state_dict(),
              'run_linprobe.py': _probe_model().state_dict()}
    assert {name: written_by(state) for name, state in states.items()} == {name: name for name in states}
    assert written_by({f'module.{k}': v for k, v in states['run_pretrain.py'].items()}) == 'run_pretrain.py'
    assert written_by({'fc.weight': torch.zeros(2, 2)}) is None
    path = tmp_path / 'checkpoint-last.pth'

    def check(model, state, **flags):
        args = argparse.Namespace(**{'resume': '', 'eval': False, 'output_dir': str(tmp_path), **flags})
        with pytest.raises(SystemExit) as stop:
            check_written_by_this_script(args, path, state, model)
        return str(stop.value.code)

    # auto-resume found another script's run in --output_dir
    assert check(_tiny(), states['run_pretrain.py']) == (
        f'error: --output_dir {tmp_path} holds a run of run_pretrain.py ({path}): write this run into another '
        '--output_dir (a pretraining checkpoint goes to --finetune)')
    assert check(_probe_model(), states['run_finetune.py']).endswith('(or continue that run with run_finetune.py)')
    assert check(_tiny(), states['run_linprobe.py'], eval=True).endswith(
        'evaluate it with run_linprobe.py, or name this script\'s checkpoint with --resume')
    # an explicit --resume
    assert check(_tiny(), states['run_linprobe.py'], resume=str(path), eval=True) == (
        f'error: {path} is a checkpoint of run_linprobe.py: evaluate it with run_linprobe.py (--resume and --eval '
        'take run_finetune.py\'s own checkpoints)')
    assert 'pass it as --finetune' in check(_probe_model(), states['run_pretrain.py'], resume=str(path))
    # its own kind passes (whether it fits is load_state_dict's to say)
    check_written_by_this_script(argparse.Namespace(resume=str(path), eval=True, output_dir=''), path,
                                 _probe_model().state_dict(), _probe_model())


def test_wrong_file_cli_exits_cleanly(tmp_path, demo_data):
    bad = tmp_path / 'garbage.pth'
    bad.write_bytes(b'definitely not a checkpoint' * 10)
    res = run_script(['run_finetune.py', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
                      '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu',
                      '--data_path', str(demo_data), '--output_dir', str(tmp_path / 'out'), '--finetune', str(bad)])
    assert res.returncode != 0
    assert 'error: cannot read checkpoint' in res.stderr
    assert 'Traceback' not in res.stderr + res.stdout


# ---- layer-wise lr decay -------------------------------------------------------------------------

def test_layer_decay_groups():
    model = _tiny(global_pool=True)
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
    num_layers = 12 + 1
    expected_layer = {'cls_token': 0, 'pos_embed': 0, 'patch_embed.proj.weight': 0, 'patch_embed.proj.bias': 0,
                      'blocks.0.attn.qkv.weight': 1, 'blocks.0.norm1.bias': 1, 'blocks.5.mlp.fc1.weight': 6,
                      'blocks.11.mlp.fc2.weight': 12, 'fc_norm.weight': 13, 'head.weight': 13, 'head.bias': 13}
    seen = {}
    for g in groups:
        for name in g['param_names']:
            assert name not in seen
            seen[name] = g
    assert set(seen) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in expected_layer.items():
        assert layer_id_for_vit(name, num_layers) == layer
        assert seen[name]['lr_scale'] == pytest.approx(0.75 ** (num_layers - layer)), name
    assert seen['head.weight']['lr_scale'] == 1.0
    no_decay = {'cls_token', 'pos_embed', 'patch_embed.proj.bias', 'blocks.0.norm1.weight', 'blocks.0.norm1.bias',
                'blocks.0.attn.qkv.bias', 'fc_norm.weight', 'fc_norm.bias', 'head.bias'}
    decay = {'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.11.mlp.fc2.weight', 'head.weight'}
    for name in no_decay:
        assert seen[name]['weight_decay'] == 0.0, name
    for name in decay:
        assert seen[name]['weight_decay'] == 0.05, name
    for name, g in seen.items():  # the rule as stated: no decay on 1-D, biases, pos_embed, cls_token
        p = dict(model.named_parameters())[name]
        wanted = 0.0 if (p.ndim <= 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')) else 0.05
        assert g['weight_decay'] == wanted, name

    # the per-iteration schedule applies lr * lr_scale to each group
    from util.lr_sched import set_group_lrs
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_group_lrs(opt, 4e-3)
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(4e-3 * 0.75 ** (num_layers - g['layer']))


# ---- model read-out ------------------------------------------------------------------------------

def test_readout_global_pool_and_cls_token():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gp = _tiny(global_pool=True).eval()
    assert isinstance(gp.norm, torch.nn.Identity) and isinstance(gp.fc_norm, torch.nn.LayerNorm)
    tokens = gp.blocks(gp._pos_embed(gp.patch_embed(x)))
    assert torch.allclose(gp.forward_pooled(x), gp.fc_norm(tokens[:, 1:].mean(1)), atol=1e-5)
    cls = _tiny(global_pool=False).eval()
    assert isinstance(cls.fc_norm, torch.nn.Identity) and isinstance(cls.norm, torch.nn.LayerNorm)
    tokens = cls.blocks(cls._pos_embed(cls.patch_embed(x)))
    assert torch.allclose(cls.forward_pooled(x), cls.norm(tokens)[:, 0], atol=1e-5)
    assert cls(x).shape == gp(x).shape == (2, 4)
    with pytest.raises(SystemExit, match='pretraining name'):
        models_vit.build_model('MIM_vit_base_patch16')


# ---- data layouts ----------------------------------------------------------------------------------

def test_data_layouts(tmp_path, demo_data):
    from util.data import build_classification_datasets
    # the researcher's layout: <root>/<split>/image_folders/<class>
    nested = tmp_path / 'nested'
    for split in ('train', 'val'):
        shutil.copytree(demo_data / split, nested / split / 'image_folders')
    train, val = build_classification_datasets(str(nested), None, None)
    plain_train, _ = build_classification_datasets(str(demo_data), None, None)
    assert train.classes == plain_train.classes and len(train.classes) == 4
    assert train.root.endswith('image_folders') and len(val) == 8

    # val with fewer classes keeps train's indices
    partial = tmp_path / 'partial'
    shutil.copytree(demo_data / 'train', partial / 'train')
    last = plain_train.classes[-1]
    shutil.copytree(demo_data / 'val' / last, partial / 'val' / last)
    train, val = build_classification_datasets(str(partial), None, None)
    assert {t for _, t in val.samples} == {train.class_to_idx[last]} == {3}

    # only a train split
    only_train = tmp_path / 'only_train'
    shutil.copytree(demo_data / 'train', only_train / 'train')
    with pytest.raises(SystemExit, match='no "val" split folder'):
        build_classification_datasets(str(only_train), None, None)
    with pytest.raises(SystemExit, match='does not exist'):
        build_classification_datasets(str(tmp_path / 'missing'), None, None)


# ---- flags -------------------------------------------------------------------------------------------

UPSTREAM_FLAGS = """--batch_size --epochs --accum_iter --model --input_size --drop_path --clip_grad --weight_decay --lr
--blr --layer_decay --min_lr --warmup_epochs --color_jitter --aa --smoothing --reprob --remode --recount --resplit
--mixup --cutmix --cutmix_minmax --mixup_prob --mixup_switch_prob --mixup_mode --finetune --global_pool --cls_token
--data_path --nb_classes --output_dir --log_dir --device --seed --resume --eval --dist_eval --num_workers --pin_mem
--world_size --local_rank --dist_url""".split()


def test_flags_and_help_texts():
    import run_finetune
    import run_knn
    import run_linprobe
    parser = run_finetune.get_args_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    assert set(UPSTREAM_FLAGS) <= options
    for p in (parser, run_linprobe.get_args_parser(), run_knn.get_args_parser()):
        for action in p._actions:
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help and len(action.help) > 10, action.option_strings


def test_research_notes_command_parses(tmp_path):
    """The notes' command, as torch.distributed.launch passes it (plus --local-rank=N)."""
    import run_finetune
    cmd = ('--local-rank=0 --world_size 4 --accum_iter 2 --batch_size 128 --model vit_base_patch16 --finetune '
           '/path/checkpoint-99.pth --epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 '
           '--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path '
           '/raid/utku/datasets/imagenet/classification/ --output_dir full_finetune_out/ --log_dir full_finetune_out')
    args = run_finetune.get_args_parser().parse_args(cmd.split())
    # a missing checkpoint or model name is reported before the data folders are scanned
    with pytest.raises(SystemExit, match='--finetune /path/checkpoint-99.pth does not exist'):
        run_finetune.check_args(args)
    args.finetune = tmp_path / 'checkpoint-99.pth'
    args.finetune.write_bytes(b'x')
    run_finetune.check_args(args)
    with pytest.raises(SystemExit, match='pretraining name'):
        run_finetune.check_args(argparse.Namespace(**{**vars(args), 'model': 'MIM_vit_base_patch16'}))
    assert (args.local_rank, args.world_size, args.accum_iter, args.batch_size) == (0, 4, 2, 128)
    assert args.lr == 4e-3 and args.layer_decay == 0.75 and args.dist_eval and args.global_pool
    assert run_finetune.mixup_active(args)


# ---- end to end ------------------------------------------------------------------------------------

def test_finetune_end_to_end_then_eval(tmp_path, demo_data, pretrain_ckpt):
    out = tmp_path / 'ft'
    common = ['--model', 'vit_tiny_patch16', '--input_size', '64', '--batch_size', '4', '--num_workers', '0',
              '--device', 'cpu', '--data_path', str(demo_data), '--output_dir', str(out)]
    res = run_script(['run_finetune.py', *common, '--finetune', str(pretrain_ckpt), '--epochs', '2',
                      '--warmup_epochs', '1', '--accum_iter', '2', '--blr', '1e-2', '--mixup', '0.8', '--cutmix',
                      '1.0', '--reprob', '0.25', '--clip_grad', '5.0', '--drop_path', '0.1', '--print_freq', '2'])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'position embedding interpolated from 2x2 to 4x4' in res.stdout
    assert ("missing keys (left at init: the read-out, which pretraining does not train): ['fc_norm.weight', "
            "'fc_norm.bias', 'head.weight', 'head.bias']") in res.stdout
    assert re.search(r'Epoch \[1\] \[8/8\] .* grad norm [\d.]+  \d+ img/s  data wait \d+%', res.stdout), res.stdout
    accuracy = [line for line in res.stdout.splitlines() if line.startswith('Accuracy of the network')]
    assert len(accuracy) == 2 and re.search(r'; 1 of 2 epochs done, run eta \d+:\d\d:\d\d$', accuracy[0]), accuracy
    assert accuracy[1].endswith('; 2 of 2 epochs done'), accuracy
    lines = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    assert [l['epoch'] for l in lines] == [0, 1]
    for l in lines:
        assert {'train_loss', 'train_lr', 'test_acc1', 'test_acc5', 'test_loss', 'n_parameters'} <= set(l)
        assert 0 <= l['test_acc1'] <= l['test_acc5'] <= 100 and l['test_num_samples'] == 8
    for name in ('checkpoint-last.pth', 'checkpoint-best.pth', 'checkpoint-1.pth'):
        assert (out / name).is_file(), name
    assert (f'outputs: {out.resolve()} (log.txt, checkpoint-best.pth, checkpoint-last.pth, checkpoint-<epoch>.pth '
            'every --save_freq 20 epochs)') in res.stdout, res.stdout[-2000:]
    assert list(out.glob('events.out.tfevents.*'))
    best = torch.load(out / 'checkpoint-best.pth', weights_only=True)
    best_line = lines[best['epoch']]
    assert best_line['test_acc1'] == max(l['test_acc1'] for l in lines)
    assert set(best['model']) == set(_tiny(img_size=64).state_dict())

    res = run_script(['run_finetune.py', *common, '--eval', '--resume', str(out / 'checkpoint-best.pth')])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert last['mode'] == 'eval'
    assert last['test_acc1'] == best_line['test_acc1']
    assert last['test_loss'] == pytest.approx(best_line['test_loss'], rel=1e-4)
    assert '* Acc@1 ' in res.stdout and ' Acc@4 ' in res.stdout  # 4 classes: top-5 is top-4
    assert f'evaluating {out / "checkpoint-best.pth"} (epoch {best["epoch"]})' in res.stdout
    assert 'resumed from' not in res.stdout, res.stdout[-3000:]

    # --eval at another --input_size: the error names the flag the checkpoint was written with
    res = run_script(['run_finetune.py', *common[:2], '--input_size', '32', *common[4:], '--eval', '--resume',
                      str(out / 'checkpoint-best.pth')])
    assert res.returncode != 0 and 'Traceback' not in res.stdout + res.stderr, res.stdout[-3000:] + res.stderr
    assert 'this run has --input_size 32 (checkpoint: 64)' in res.stderr, res.stderr

    # a longer run in the same folder resumes from checkpoint-last.pth and keeps the best so far
    res = run_script(['run_finetune.py', *common, '--finetune', str(pretrain_ckpt), '--epochs', '3',
                      '--warmup_epochs', '1', '--accum_iter', '2', '--blr', '1e-2'])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'resumed from' in res.stdout and 'checkpoint-last.pth (epoch 1)' in res.stdout
    lines = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    assert [l.get('epoch') for l in lines] == [0, 1, None, 2]
    assert lines[-1]['max_accuracy'] == max(l['test_acc1'] for l in lines)
    assert '--epochs 3 (checkpoint: 2)' in res.stdout  # the cosine is stretched mid-run: said so
    # test accuracy on the training curves' axis, at each epoch's last step: one point per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars('perf/test_acc1')] == [999, 1999, 2999]

    # relaunched when finished: nothing to train, and it says so
    res = run_script(['run_finetune.py', *common, '--finetune', str(pretrain_ckpt), '--epochs', '3',
                      '--warmup_epochs', '1'])
    assert res.returncode == 0 and 'all 3 epochs are done' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # another encoder into the same folder: its auto-resume would replace the new encoder's weights
    other = tmp_path / 'other_encoder.pth'
    shutil.copy(pretrain_ckpt, other)
    res = run_script(['run_finetune.py', *common, '--finetune', str(other), '--epochs', '3', '--warmup_epochs', '1'])
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    assert f'holds a run of --finetune {pretrain_ckpt}' in res.stderr and '--no_auto_resume' in res.stderr

    # the last epoch redone from an older checkpoint: its test point is shown once
    for name in ('checkpoint-last.pth', 'checkpoint-2.pth'):
        (out / name).unlink()
    res = run_script(['run_finetune.py', *common, '--finetune', str(pretrain_ckpt), '--epochs', '3',
                      '--warmup_epochs', '1', '--accum_iter', '2', '--blr', '1e-2'])
    assert res.returncode == 0 and 'checkpoint-1.pth (epoch 1)' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars('perf/test_acc1')] == [999, 1999, 2999]
    assert [l.get('epoch') for l in map(json.loads, (out / 'log.txt').read_text().splitlines())] == [0, 1, None, 2]



def test_a_run_whose_encoder_file_moved_still_continues(tmp_path, demo_data, pretrain_ckpt):
    """Resuming needs only the run's own checkpoint: an encoder since moved (a fresh pretraining in
    its folder sets its checkpoints aside) or deleted is noted, not an error; so is --eval's."""
    encoder = tmp_path / 'pre' / 'checkpoint-3.pth'
    encoder.parent.mkdir()
    shutil.copy(pretrain_ckpt, encoder)
    out = tmp_path / 'ft'
    common = ['run_finetune.py', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
              '--num_workers', '0', '--device', 'cpu', '--data_path', str(demo_data), '--output_dir', str(out),
              '--warmup_epochs', '0']
    res = run_script([*common, '--finetune', str(encoder), '--epochs', '1'])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    moved = tmp_path / 'pre' / 'previous' / 'checkpoint-3.pth'
    moved.parent.mkdir()
    encoder.rename(moved)
    res = run_script([*common, '--finetune', str(encoder), '--epochs', '2'])  # the same command, longer
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f'note: --finetune {encoder} does not exist; continuing the run in {out}' in res.stdout
    assert 'checkpoint-last.pth (epoch 0)' in res.stdout
    assert [json.loads(l)['epoch'] for l in (out / 'log.txt').read_text().splitlines()] == [0, 1]
    res = run_script([*common, '--finetune', str(moved), '--epochs', '2'])  # pointed at where it went
    assert res.returncode == 0 and 'all 2 epochs are done' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert f'continues a run of --finetune {encoder}, which is gone' in res.stdout
    res = run_script([*common, '--eval', '--resume', str(out / 'checkpoint-best.pth'), '--finetune', str(encoder)])
    assert res.returncode == 0 and '* Acc@1 ' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # a new run (nothing to continue in its folder) still needs the file
    res = run_script([*common[:-4], '--output_dir', str(tmp_path / 'new'), '--warmup_epochs', '0',
                      '--finetune', str(encoder), '--epochs', '1'])
    assert res.returncode != 0 and f'error: --finetune {encoder} does not exist' in res.stderr, res.stderr


def test_best_checkpoint_is_the_best_epoch_when_last_is_saved_rarely(tmp_path, demo_data, monkeypatch):
    """With --save_last_freq > 1, checkpoint-last.pth is older than the epoch that improved;
    checkpoint-best.pth must still be that epoch, not a copy of an older one."""
    import engine_finetune
    import run_finetune
    accuracies = iter([10.0, 30.0, 20.0])  # epoch 1 is the best, and its checkpoint-last is skipped
    monkeypatch.setattr(engine_finetune, 'evaluate', lambda *a, **k: {
        'acc1': next(accuracies), 'acc5': 100.0, 'loss': 1.0, 'num_samples': 8})
    out = tmp_path / 'ft'
    args = run_finetune.get_args_parser().parse_args([
        '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
        '--device', 'cpu', '--data_path', str(demo_data), '--output_dir', str(out), '--epochs', '3',
        '--warmup_epochs', '0', '--save_freq', '100', '--save_last_freq', '5'])
    run_finetune.main(args)
    best = torch.load(out / 'checkpoint-best.pth', weights_only=True)
    assert best['epoch'] == 1 and set(best) >= {'model', 'optimizer', 'args', 'rng'}
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] == 2  # the last epoch is saved
    assert [json.loads(line)['max_accuracy'] for line in (out / 'log.txt').read_text().splitlines()] == [10, 30, 30]


def _log_epochs(out: Path) -> list[int]:
    log = out / 'log.txt'
    return [json.loads(line)['epoch'] for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.parametrize('stopped_at', [0, 1])
def test_a_run_stopped_during_evaluation_keeps_the_epoch(tmp_path, demo_data, monkeypatch, capsys, stopped_at):
    """fit saves an epoch's checkpoint (with its training record) before evaluating it: a run stopped
    during the evaluation keeps the epoch's training, and the rerun evaluates that epoch first (also
    when it was the last one), then goes on. Its log and best checkpoint end as a straight run's.
    (--accum_iter 3 leaves micro-batches over: a rerun that only evaluates says nothing of them.)"""
    import engine_finetune
    import run_finetune
    argv = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
            '--device', 'cpu', '--data_path', str(demo_data), '--epochs', '2', '--warmup_epochs', '0',
            '--accum_iter', '3']
    left_over = 'skipped each epoch'

    def run(out: Path) -> None:
        run_finetune.main(run_finetune.get_args_parser().parse_args([*argv, '--output_dir', str(out)]))
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    run(straight)
    assert left_over in capsys.readouterr().out
    real_evaluate, evaluated = engine_finetune.evaluate, []

    def stopped_in_evaluation(*a, **k):
        evaluated.append(None)
        if len(evaluated) == stopped_at + 1:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)
    monkeypatch.setattr(engine_finetune, 'evaluate', stopped_in_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run(stopped)
    assert torch.load(stopped / 'checkpoint-last.pth', weights_only=True)['epoch'] == stopped_at
    assert _log_epochs(stopped) == list(range(stopped_at))
    monkeypatch.setattr(engine_finetune, 'evaluate', real_evaluate)
    capsys.readouterr()
    run(stopped)  # the same process: its lock is its own
    rerun = capsys.readouterr().out
    assert (f'epoch {stopped_at} was saved, but the run stopped before its evaluation was logged: evaluating '
            f'{stopped / "checkpoint-last.pth"} first') in rerun
    assert (left_over in rerun) == (stopped_at == 0), rerun  # trains epoch 1, or nothing
    timing = {'train_epoch_time', 'train_images_per_s', 'train_data_wait_s'}
    lines = [[{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (out / 'log.txt').read_text().splitlines()] for out in (straight, stopped)]
    assert [rec['epoch'] for rec in lines[1]] == [0, 1]
    assert lines[0] == lines[1]  # train records from the checkpoint, the same evaluation, the same best so far
    for name in ('checkpoint-last.pth', 'checkpoint-best.pth'):
        a, b = (torch.load(out / name, weights_only=True) for out in (straight, stopped))
        assert a['epoch'] == b['epoch'] and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert not list(stopped.glob('previous-*')), 'nothing of the stopped run was set aside'


def test_an_interruption_before_the_checkpoint_redoes_the_epoch(tmp_path, demo_data, monkeypatch):
    """Stopped while writing an epoch's checkpoint (before its evaluation and log line), the rerun
    trains the epoch again from the previous checkpoint; the log has each epoch once."""
    import run_finetune
    out = tmp_path / 'ft'
    argv = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
            '--device', 'cpu', '--data_path', str(demo_data), '--output_dir', str(out), '--epochs', '2',
            '--warmup_epochs', '0']
    real_save = run_finetune.save_checkpoint

    def interrupted_at_epoch_1(args, model, optimizer, scaler, epoch, **kw):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_save(args, model, optimizer, scaler, epoch, **kw)
    monkeypatch.setattr(run_finetune, 'save_checkpoint', interrupted_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_finetune.main(run_finetune.get_args_parser().parse_args(argv))
    assert _log_epochs(out) == [0]
    monkeypatch.setattr(run_finetune, 'save_checkpoint', real_save)
    run_finetune.main(run_finetune.get_args_parser().parse_args(argv))
    assert _log_epochs(out) == [0, 1]
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] == 1


def test_a_val_image_that_cannot_be_decoded_stops_with_the_way_on(tmp_path, demo_data, pretrain_ckpt):
    """Found only when the first epoch is evaluated: the error names the file and says the rerun
    resumes; with the file replaced, the same command evaluates the saved epoch and finishes."""
    data = tmp_path / 'data'
    shutil.copytree(demo_data, data)
    victim = sorted((data / 'val').rglob('*.jpg'))[1]
    good = victim.read_bytes()
    victim.write_bytes(b'not an image')
    out = tmp_path / 'ft'
    cmd = ['run_finetune.py', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
           '--num_workers', '1', '--device', 'cpu', '--data_path', str(data), '--finetune', str(pretrain_ckpt),
           '--output_dir', str(out), '--epochs', '2', '--warmup_epochs', '0']
    res = run_script(cmd)
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f'error: cannot decode {victim}: '), res.stderr[-2000:]
    assert res.stderr.strip().endswith(f'; replace or remove that file; the same command resumes from '
                                       f'{out / "checkpoint-last.pth"}'), res.stderr[-2000:]
    victim.write_bytes(good)
    res = run_script(cmd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'epoch 0 was saved, but the run stopped before its evaluation was logged' in res.stdout
    assert _log_epochs(out) == [0, 1]


def test_fine_tuning_into_the_encoders_own_folder_is_refused(tmp_path, pretrain_ckpt):
    import run_finetune
    encoder = tmp_path / 'checkpoint-99.pth'
    shutil.copy(pretrain_ckpt, encoder)
    args = run_finetune.get_args_parser().parse_args(['--model', 'vit_tiny_patch16', '--finetune', str(encoder),
                                                      '--output_dir', str(tmp_path) + '/'])
    with pytest.raises(SystemExit, match='holds the --finetune encoder'):
        run_finetune.check_args(args)


def test_finetune_resume_is_exact(tmp_path, demo_data, pretrain_ckpt):
    """Resuming after epoch 1 of 3 ends with the uninterrupted run's weights (with --num_workers 0 the
    augmentation draws from the RNG the checkpoint restores; evaluation must not draw from it)."""
    common = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
              '--device', 'cpu', '--data_path', str(demo_data), '--finetune', str(pretrain_ckpt), '--epochs', '3',
              '--warmup_epochs', '1', '--blr', '1e-2', '--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25',
              '--drop_path', '0.1', '--save_freq', '1']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    res = run_script(['run_finetune.py', *common, '--output_dir', str(straight)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = run_script(['run_finetune.py', *common, '--output_dir', str(resumed),
                      '--resume', str(straight / 'checkpoint-1.pth')])
    assert res.returncode == 0 and 'resumed from' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # the encoder is not loaded only to be replaced (and its head init draws no RNG the resume restores)
    assert 'loading encoder from' not in res.stdout and f'so --finetune {pretrain_ckpt} is not loaded' in res.stdout
    a = torch.load(straight / 'checkpoint-last.pth', weights_only=True)['model']
    b = torch.load(resumed / 'checkpoint-last.pth', weights_only=True)['model']
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed fine-tuning diverged from the uninterrupted run'


def test_the_checkpoint_keeps_its_classes_resume_refuses_others_and_eval_notes_them(tmp_path, demo_data, capsys):
    """A classifier's output i means its data's class i: the checkpoints record the class names;
    resuming on data with other classes (same count, so the weights would load) is refused, and
    --eval on such data says what its accuracy counts."""
    import run_finetune
    other = tmp_path / 'other'
    shutil.copytree(demo_data, other)
    classes = sorted(p.name for p in (demo_data / 'train').iterdir())
    for split in ('train', 'val'):
        (other / split / classes[0]).rename(other / split / 'zz_other')
    out = tmp_path / 'ft'
    common = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
              '--device', 'cpu', '--warmup_epochs', '0']

    def run(*flags: str) -> None:
        run_finetune.main(run_finetune.get_args_parser().parse_args([*common, *flags]))
    run('--data_path', str(demo_data), '--output_dir', str(out), '--epochs', '1')
    for name in ('checkpoint-last.pth', 'checkpoint-best.pth'):
        assert torch.load(out / name, weights_only=True)['classes'] == classes
    with pytest.raises(SystemExit) as e:
        run('--data_path', str(other), '--output_dir', str(out), '--epochs', '2')
    assert 'was trained on other classes than' in str(e.value) and f'{classes[0]} there, {classes[1]} here' in str(
        e.value)
    capsys.readouterr()
    run('--data_path', str(other), '--output_dir', str(tmp_path / 'eval'), '--eval', '--resume',
        str(out / 'checkpoint-best.pth'))
    assert "its accuracy counts the checkpoint's class i as the data's class i" in capsys.readouterr().out


def test_finetune_two_processes_distributed_launch(tmp_path, demo_data, pretrain_ckpt):
    """The research notes' launcher and flags (--world_size, --accum_iter, --dist_eval), 2 CPU processes."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = tmp_path / 'ftd'
    cmd = ['-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={port}',
           'run_finetune.py', '--world_size', '2', '--accum_iter', '2', '--batch_size', '4',
           '--model', 'vit_tiny_patch16', '--input_size', '32', '--finetune', str(pretrain_ckpt),
           '--epochs', '1', '--warmup_epochs', '0', '--lr', '4e-3', '--layer_decay', '0.75',
           '--drop_path', '0.1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0', '--dist_eval',
           '--data_path', str(demo_data), '--output_dir', str(out), '--log_dir', str(out),
           '--num_workers', '0', '--device', 'cpu']
    res = run_script(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'distributed init (rank 0/2' in res.stdout
    line = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert line['epoch'] == 0 and line['test_num_samples'] == 8  # every val image once over both ranks
    assert (out / 'checkpoint-best.pth').is_file()
    # as if stopped during the last evaluation: the rerun evaluates the saved epoch on both ranks, trains nothing
    (out / 'log.txt').write_text('')
    res = run_script(cmd)
    assert res.returncode == 0 and 'evaluated on resume' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'Start training' not in res.stdout
    assert [json.loads(text) for text in (out / 'log.txt').read_text().splitlines()] == [line]


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """'rand-m9-mstd0.5-inc1' can draw magnitude 10, i.e. Posterize with 0 bits, which current
    Pillow rejects (a ValueError in a loader worker that killed a real fine-tuning run); older
    Pillow returned a black image."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    from util.data import finetune_train_transform
    transform = finetune_train_transform(32, None, 'rand-m9-mstd0.5-inc1', 0.25, 'pixel', 1)
    ops = [op for t in transform.transforms for op in getattr(t, 'ops', [])
           if isinstance(op, AugmentOp) and op.name.startswith('Posterize')]
    assert ops, 'the policy has a posterize op'
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    img = Image.new('RGB', (32, 32), (200, 120, 40))
    out = op(img)  # raised "bits must be between or equal to 1 and 8" before the fix
    # every bit masked off, as the Pillow upstream trained with did
    assert out.mode == img.mode and out.size == img.size and out.getextrema() == ((0, 0),) * 3
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits kept
    assert op(img).getpixel((0, 0)) == (192, 64, 0)
    transform(img)  # the whole pipeline runs
