"""FreezeOut: the schedule math (design.md section 3) and what 'frozen' means in the model and
optimizer: no autograd, no gradient, no optimizer state, no weight decay, dropped taps."""
import math

import pytest
import torch

import models_mim
from util import freezeout as fo
from util.optim import build_adamw, param_groups_weight_decay


# ---- pure math -----------------------------------------------------------------------------
@pytest.mark.parametrize('how, power', [('linear', 1), ('squared', 2), ('cubic', 3)])
def test_freeze_fractions_follow_the_scale(how, power):
    t = fo.freeze_fractions(13, 0.5, how)
    assert len(t) == 13
    for i, ti in enumerate(t):
        assert ti == pytest.approx((0.5 + 0.5 * i / 12) ** power)
    assert t[-1] == 1.0
    assert all(a < b for a, b in zip(t, t[1:]))


def test_freeze_step_is_ceil_of_t_times_T():
    assert fo.freeze_step(0.5, 10) == 5
    assert fo.freeze_step(0.51, 10) == 6
    assert fo.freeze_step(1.0, 1000) == 1000
    assert fo.freeze_step(0.8 ** 3, 1000) == math.ceil(0.512 * 1000)


def test_layer_lr_warmup_cosine_and_zero_at_t():
    T, W, peak, t = 1000, 100, 2.0, 0.6
    assert fo.layer_lr(0, T, W, peak, t) == 0.0
    assert fo.layer_lr(50, T, W, peak, t) == pytest.approx(1.0)          # linear warmup
    assert fo.layer_lr(100, T, W, peak, t) == pytest.approx(peak)        # end of warmup: the peak
    halfway = W + (t * T - W) / 2                                         # halfway down the cosine
    assert fo.layer_lr(int(halfway), T, W, peak, t) == pytest.approx(peak / 2)
    assert fo.layer_lr(599, T, W, peak, t) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 499 / 500)))
    assert fo.layer_lr(600, T, W, peak, t) == 0.0                        # zero (and frozen) at t
    assert fo.layer_lr(900, T, W, peak, t) == 0.0


def test_peak_lr_scaling():
    assert fo.peak_lr(1e-3, 0.5, True) == pytest.approx(2e-3)
    assert fo.peak_lr(1e-3, 0.5, False) == 1e-3


def test_schedule_end_of_warmup_peaks_per_layer():
    s = fo.FreezeOutSchedule.build(num_layers=13, tap_layers=[2, 4, 10, 12], lr=1e-3, t_0=0.8,
                                   how_scale='cubic', scale_lr=True, decoder_freeze='tap', epochs=10,
                                   steps_per_epoch=100, warmup_epochs=1)
    assert s.total_steps == 1000 and s.warmup_steps == 100
    for i in range(13):
        assert s.lr(i, 100) == pytest.approx(1e-3 / s.t[i])
        assert s.freeze_steps[i] == math.ceil(s.t[i] * 1000 - 1e-9)
    assert s.freeze_steps[-1] == 1000  # the last block trains to the end


@pytest.mark.parametrize('kwargs, words', [
    (dict(t_0=0.0), '(0, 1]'),
    (dict(t_0=1.5), '(0, 1]'),
    (dict(t_0=0.5, how_scale='cubic', warmup_epochs=20, epochs=100), 'at 0.125 of the run (cubic(0.5)), inside the '
                                                                      'warmup (20 of 100 epochs = 0.200)'),
    # at its very end: the cosine would have no steps (a zero span)
    (dict(t_0=0.5, how_scale='linear', warmup_epochs=5, epochs=10), 'at 0.500 of the run (linear(0.5)), at the end '
                                                                    'of the warmup (5 of 10 epochs = 0.500)'),
    (dict(how_scale='quartic'), 'how_scale'),
    (dict(decoder_freeze='sometimes'), 'decoder_freeze'),
])
def test_validate_rejects_bad_configs(kwargs, words):
    args = dict(t_0=0.8, how_scale='cubic', decoder_freeze='tap', warmup_epochs=1, epochs=10)
    args.update(kwargs)
    with pytest.raises(SystemExit) as e:
        fo.validate(**args)
    assert words in str(e.value)


def test_num_frozen_and_live_taps():
    s = fo.FreezeOutSchedule.build(13, [2, 4, 10, 12], 1e-3, 0.5, 'linear', True, 'tap', 4, 12, 1)
    # layers 0..2 frozen -> tap 0 (reads layer 2) dropped
    step = s.freeze_steps[2]
    assert s.num_frozen(step) == 3
    assert s.live_taps(step) == [1, 2, 3]
    assert s.num_frozen(step - 1) == 2 and s.live_taps(step - 1) == [0, 1, 2, 3]
    never = fo.FreezeOutSchedule.build(13, [2, 4, 10, 12], 1e-3, 0.5, 'linear', True, 'never', 4, 12, 1)
    assert never.live_taps(step) == [0, 1, 2, 3]


def test_schedule_layer_of_params():
    taps = [2, 4, 10, 12]
    assert fo.schedule_layer('patch_embed.proj.weight', taps, 'tap', 13) == 0
    assert fo.schedule_layer('cls_token', taps, 'tap', 13) == 0
    assert fo.schedule_layer('blocks.4.mlp.fc1.weight', taps, 'tap', 13) == 5
    assert fo.schedule_layer('decoder.1.embed.weight', taps, 'tap', 13) == 4
    assert fo.schedule_layer('norm.2.weight', taps, 'tap', 13) == 10
    assert fo.schedule_layer('decoder.1.embed.weight', taps, 'never', 13) == 12


# ---- applied to a model --------------------------------------------------------------------
def _setup(decoder_freeze='tap', t_0=0.5, epochs=4, steps=6):
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch16(img_size=32)
    sched = fo.FreezeOutSchedule.build(model.num_layers, model.tap_layers, 1e-3, t_0, 'linear', True,
                                       decoder_freeze, epochs, steps, 1)
    layer_of = lambda n: fo.schedule_layer(n, model.tap_layers, decoder_freeze, model.num_layers)  # noqa: E731
    opt = build_adamw(param_groups_weight_decay(model, 0.05, layer_of), 1e-3, torch.device('cpu'))
    return model, opt, sched, fo.FreezeOut(model, opt, sched)


def _train_step(model, opt, x):
    loss = model(x, mask_ratio=0.75)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def test_frozen_layers_leave_the_computation():
    model, opt, sched, applier = _setup()
    x = torch.randn(2, 3, 32, 32)
    _train_step(model, opt, x)  # creates Adam state for everything
    step = sched.freeze_steps[5]  # layers 0..5 frozen -> taps 0 and 1 (layers 2, 4) dropped
    assert applier.on_step(step) is True
    assert model.num_frozen == 6 and model.live_taps == [2, 3]

    frozen_params = [p for n, p in model.named_parameters()
                     if fo.param_layer(n) is not None and fo.param_layer(n) < 6]
    dropped = list(model.decoder[0].parameters()) + list(model.norm[1].parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen_params + dropped)
    assert all(p not in opt.state for p in frozen_params + dropped)  # Adam moments freed
    for group in opt.param_groups:
        if group['layer'] < 6:
            assert group['lr'] == 0.0

    # no gradient hook fires in a frozen module, and frozen weights stay bitwise unchanged
    fired = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        p.register_hook(lambda g, n=n: fired.append(n))
    frozen_tensors = {id(p): p for p in frozen_params + dropped}
    hooks = [model.blocks[b].register_full_backward_hook(lambda *a, b=b: fired.append(f'frozen block {b}'))
             for b in range(5)]
    before = {k: p.detach().clone() for k, p in frozen_tensors.items()}
    loss, terms = model(x, mask_ratio=0.75, return_terms=True)
    assert sorted(terms) == [2, 3]  # the number of loss terms equals the live taps
    loss.backward()
    opt.step()
    assert not any(name.startswith('frozen block') for name in fired)
    assert any(name.startswith('blocks.11') for name in fired)  # live parameters did get gradients
    for k, p in frozen_tensors.items():
        assert torch.equal(p, before[k]) and p.grad is None
    for h in hooks:
        h.remove()


def test_frozen_prefix_runs_without_autograd():
    model, opt, sched, applier = _setup()
    applier.on_step(sched.freeze_steps[3])  # layers 0..3 frozen
    seen = {}
    for b in range(len(model.blocks)):
        model.blocks[b].register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(b, o.requires_grad))
    model(torch.randn(2, 3, 32, 32))
    assert [seen[b] for b in range(3)] == [False, False, False]  # blocks 0..2 = layers 1..3
    assert all(seen[b] for b in range(3, 12))


def test_decoder_freeze_never_keeps_all_taps_training():
    model, opt, sched, applier = _setup(decoder_freeze='never')
    applier.on_step(sched.freeze_steps[5])
    assert model.live_taps == [0, 1, 2, 3]
    assert all(p.requires_grad for p in model.decoder[0].parameters() if p is not model.decoder[0].pos_embed)
    loss, terms = model(torch.randn(2, 3, 32, 32), return_terms=True)
    assert len(terms) == 4
    loss.backward()
    assert model.decoder[0].embed.weight.grad is not None  # trains on frozen features
    assert model.blocks[0].attn.qkv.weight.grad is None


def test_applier_sets_each_groups_lr_from_the_schedule():
    model, opt, sched, applier = _setup()
    step = 8
    applier.on_step(step)
    for group in opt.param_groups:
        assert group['lr'] == pytest.approx(sched.lr(group['layer'], step))
    assert applier.on_step(step) is False  # nothing new to freeze


def test_schedule_table_lists_every_layer_with_its_params(tmp_path):
    model, opt, sched, applier = _setup()
    table = sched.table(fo.param_prefixes(model, sched))
    path = fo.write_table(table, tmp_path)
    assert path.name == 'freezeout_schedule.json'
    rows = table['layers']
    assert [r['index'] for r in rows] == list(range(13))
    assert 'patch_embed' in rows[0]['params'] and 'cls_token' in rows[0]['params']
    assert rows[2]['params'] == ['blocks.1', 'norm.0', 'decoder.0']
    assert all(r['freeze_step'] == math.ceil(r['t'] * table['total_steps'] - 1e-9) for r in rows)
    assert 'freeze_step' in fo.format_table(table)
    # the settings it was built from, so the file alone says which schedule it is
    assert {k: table[k] for k in ('t_0', 'how_scale', 'scale_lr', 'lr')} == {
        't_0': sched.t_0, 'how_scale': sched.how_scale, 'scale_lr': sched.scale_lr, 'lr': sched.run_lr}
    assert sched.t_0 is not None and f'{sched.how_scale} t_0 {sched.t_0:g}, lr ' in fo.format_table(table)


def test_layers_frozen_wording():
    assert [fo.layers_frozen(n) for n in (0, 1, 2)] == ['0 layers frozen', '1 layer frozen', '2 layers frozen']
