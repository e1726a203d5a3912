"""util.optim parameter groups and util.lr_sched schedules."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import models_mim
from util.lr_sched import PlainSchedule, adjust_learning_rate, optimizer_steps_per_epoch, warmup_cosine_lr
from util.optim import param_groups_weight_decay

WD = 0.05


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return models_mim.MIM_vit_tiny_patch16(img_size=32)


def _by_name(groups):
    out = {}
    for g in groups:
        assert len(g['params']) == len(g['param_names'])
        for name, p in zip(g['param_names'], g['params']):
            assert name not in out, f'{name} appears twice'
            out[name] = (g, p)
    return out


def test_weight_decay_split(model):
    model.set_frozen(0, [0, 1, 2, 3])
    groups = param_groups_weight_decay(model, WD)
    named = dict(model.named_parameters())
    by_name = _by_name(groups)
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert set(by_name) == trainable
    for name, (g, p) in by_name.items():
        assert p is named[name]
    # fixed tables and HOG convs are never in the optimizer
    for absent in ['pos_embed', 'decoder.0.pos_embed', 'hog_enc.0.conv.weight', 'hog_enc.3.conv.weight']:
        assert absent not in by_name
    # every tensor appears exactly once across groups
    ids = [id(p) for g in groups for p in g['params']]
    assert len(ids) == len(set(ids)) == len(trainable)
    no_decay = ['patch_embed.proj.bias', 'blocks.0.norm1.weight', 'blocks.0.norm1.bias',
                'blocks.0.attn.qkv.bias', 'norm.2.weight', 'decoder.0.pred.1.weight',  # LayerNorm2d
                'decoder.0.pred.0.bias', 'decoder.3.embed.bias']
    decay = ['patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.11.mlp.fc2.weight',
             'decoder.0.pred.0.weight', 'decoder.0.embed.weight', 'decoder.1.mask_token',
             'cls_token']  # upstream's add_weight_decay decays every tensor with ndim >= 2
    for n in no_decay:
        assert by_name[n][0]['weight_decay'] == 0.0, n
    for n in decay:
        assert by_name[n][0]['weight_decay'] == WD, n
    for name, (g, p) in by_name.items():
        expected = 0.0 if (p.ndim <= 1 or name.endswith('.bias')) else WD
        assert g['weight_decay'] == expected, name
    assert all('layer' not in g for g in groups)
    assert len(groups) == 2


def test_frozen_params_absent(model):
    model.set_frozen(3, [2, 3])
    try:
        groups = param_groups_weight_decay(model, WD)
        by_name = _by_name(groups)
        for n in ['cls_token', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
                  'blocks.1.norm1.weight', 'norm.0.weight', 'decoder.1.embed.weight']:
            assert n not in by_name, n
        for n in ['blocks.2.attn.qkv.weight', 'norm.2.weight', 'decoder.3.pred.1.weight']:
            assert n in by_name, n
        assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    finally:
        model.set_frozen(0, [0, 1, 2, 3])


def test_layer_groups(model):
    model.set_frozen(0, [0, 1, 2, 3])

    def layer_of(name):
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        if name.startswith(('norm.', 'decoder.')):
            return 100 + int(name.split('.')[1])
        return 0

    groups = param_groups_weight_decay(model, WD, layer_of)
    by_name = _by_name(groups)
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, (g, p) in by_name.items():
        assert g['layer'] == layer_of(name), name
        assert g['weight_decay'] == (0.0 if (p.ndim <= 1 or name.endswith('.bias')) else WD)
    keys = [(g['layer'], g['weight_decay'] == 0.0) for g in groups]
    assert len(keys) == len(set(keys))  # one group per (layer, decay)
    assert keys == sorted(keys)  # deterministic order
    assert {g['layer'] for g in groups} == {0, *range(1, 13), 100, 101, 102, 103}
    # usable by the optimizer as is
    torch.optim.AdamW(groups, lr=1e-3)


# ---------------------------------------------------------------------------------------------
LR, MIN_LR, WARM, EPOCHS = 1e-3, 1e-5, 4, 20


def my_schedule(epoch):
    if epoch < WARM:
        return LR * epoch / WARM
    t = min((epoch - WARM) / (EPOCHS - WARM), 1.0)
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * t)) / 2


def test_warmup_cosine_key_points():
    f = lambda e: warmup_cosine_lr(e, LR, MIN_LR, WARM, EPOCHS)  # noqa: E731
    assert f(0) == 0.0
    assert f(WARM / 2) == pytest.approx(LR / 2, rel=1e-12)
    assert f(WARM / 4) == pytest.approx(LR / 4, rel=1e-12)
    assert f(WARM) == pytest.approx(LR, rel=1e-12)
    assert f(WARM + (EPOCHS - WARM) / 2) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert f(EPOCHS) == pytest.approx(MIN_LR, rel=1e-12)
    assert f(EPOCHS + 3) == pytest.approx(MIN_LR, rel=1e-12)
    # linear during warmup, monotone decreasing afterwards, and equal to the formula
    warm = [f(e) for e in torch.linspace(0, WARM, 9).tolist()]
    diffs = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(diffs[0], rel=1e-9) for d in diffs) and diffs[0] > 0
    cos = [f(e) for e in torch.linspace(WARM, EPOCHS, 17).tolist()]
    assert all(b < a for a, b in zip(cos, cos[1:]))
    for e in [0.3, 1.7, 4.0, 5.5, 11.25, 19.9]:
        assert f(e) == pytest.approx(my_schedule(e), rel=1e-12)


def _optimizer(scales=(None, 0.5, 2.0)):
    groups = []
    for s in scales:
        g = {'params': [nn.Parameter(torch.zeros(2))]}
        if s is not None:
            g['lr_scale'] = s
        groups.append(g)
    return torch.optim.SGD(groups, lr=123.0)


def test_plain_schedule_on_step():
    opt = _optimizer(scales=(None, None))
    steps_per_epoch = 7
    sched = PlainSchedule(opt, LR, MIN_LR, WARM, EPOCHS, steps_per_epoch)
    for step in [0, 1, 3, 14, 27, 28, 29, 70, 139, 140]:
        changed = sched.on_step(step)
        assert changed is False
        expected = my_schedule(step / steps_per_epoch)
        assert sched.lr_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        for g in opt.param_groups:
            assert g['lr'] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sched.num_frozen == 0


def test_plain_schedule_uses_upstreams_epoch_fraction_with_accumulation():
    # upstream sets the lr when data_iter_step % accum_iter == 0, at data_iter_step / len(loader) + epoch;
    # with 7 batches and accum_iter 2 there are 3 steps an epoch (the 7th batch is left over)
    opt = _optimizer(scales=(None,))
    batches, accum = 7, 2
    sched = PlainSchedule(opt, LR, MIN_LR, WARM, EPOCHS, batches, accum)
    step = 0
    for epoch in range(EPOCHS):
        for data_iter_step in range(0, batches - batches % accum, accum):
            sched.on_step(step)
            expected = my_schedule(data_iter_step / batches + epoch)
            assert opt.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-12, abs=1e-15)
            step += 1
    assert step == EPOCHS * sched.steps_per_epoch
    assert sched.lr_at(4) != pytest.approx(my_schedule(4 / 3), rel=1e-6)  # not step / steps_per_epoch


def test_adjust_learning_rate_honours_lr_scale():
    opt = _optimizer()
    args = SimpleNamespace(lr=LR, min_lr=MIN_LR, warmup_epochs=WARM, epochs=EPOCHS)
    for epoch in [1.5, 9.0]:
        lr = adjust_learning_rate(opt, epoch, args)
        assert lr == pytest.approx(my_schedule(epoch), rel=1e-12)
        assert [g['lr'] for g in opt.param_groups] == pytest.approx([lr, lr * 0.5, lr * 2.0], rel=1e-12)


def test_optimizer_steps_per_epoch_says_what_is_skipped(capsys):
    assert optimizer_steps_per_epoch(8, 4) == 2 and capsys.readouterr().out == ''
    assert optimizer_steps_per_epoch(8, 3) == 2
    assert capsys.readouterr().out == ('note: 8 batches per epoch make 2 optimizer steps of --accum_iter 3; '
                                       'the last 2 batches are skipped each epoch\n')
    assert optimizer_steps_per_epoch(9, 4) == 2 and 'the last batch is skipped' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='^error: 2 batches per epoch is fewer than --accum_iter 3$'):
        optimizer_steps_per_epoch(2, 3)
