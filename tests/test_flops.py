"""util/flops.py against torch's own FLOP counter on the real model."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models_mim
from util import flops


def test_step_flops_match_torch_flop_counter():
    """Forward + backward FLOPs of one image through MIM ViT-S/16 at 128 px with k layers frozen
    (as FreezeOut leaves the model), counted by torch (matmuls, convolutions, attention as
    matmuls), against the analytic count; k = 0 checks the patch embedding's backward, k = 1
    its frozen forward, 'never' the decoders of frozen taps."""
    torch.manual_seed(0)
    model = models_mim.build_model('MIM_vit_small_patch16', img_size=128)
    shape = dataclasses.replace(flops.SHAPES['MIM_vit_small_patch16'], img_size=128)
    x = torch.randn(1, 3, 128, 128)
    for k, decoder_freeze in ((0, 'tap'), (1, 'tap'), (5, 'never'), (12, 'tap')):
        live = list(range(4)) if decoder_freeze == 'never' else [j for j, layer in enumerate(model.tap_layers)
                                                                  if layer >= k]
        model.set_frozen(k, live)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, mask_ratio=0.75).backward()
        model.zero_grad(set_to_none=True)
        assert flops.step_flops(shape, k, decoder_freeze) == pytest.approx(counter.get_total_flops(), rel=0.004), \
            (k, decoder_freeze)


def test_epoch_costs_average_the_step_costs_of_each_epoch_against_the_schedule():
    """An epoch's cost is the mean over its steps of step_flops at the count frozen at that step,
    as the FreezeOut schedule freezes layers (checked step by step against the schedule itself)."""
    from util import freezeout as fo
    shape = dataclasses.replace(flops.SHAPES['MIM_vit_tiny_patch16'], img_size=64)
    schedule = fo.FreezeOutSchedule.build(13, [2, 4, 10, 12], 1e-3, 0.5, 'linear', True, 'tap', epochs=6,
                                          steps_per_epoch=7, warmup_epochs=0)
    costs = flops.epoch_costs(shape, schedule.freeze_steps, 7, 6)
    expected = [sum(flops.step_flops(shape, schedule.num_frozen(step)) for step in range(e * 7, e * 7 + 7)) / 7
                for e in range(6)]
    assert costs == pytest.approx(expected)
    assert costs[0] == pytest.approx(flops.step_flops(shape, 0)) and costs[-1] < costs[0] / 2
    assert flops.epoch_costs(shape, (), 7, 3) == pytest.approx([flops.step_flops(shape, 0)] * 3)  # plain run
