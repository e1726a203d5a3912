"""engine_pretrain.train_one_epoch in process: what gradient accumulation computes."""
import argparse
import copy

import pytest
import torch

import models_mim
from engine_pretrain import ModelHandle, train_one_epoch
from util.lr_sched import PlainSchedule

LR = 0.5


def one_epoch(model: torch.nn.Module, batches: list[torch.Tensor], accum: int) -> None:
    """One epoch of constant-lr plain SGD (its update is lr x gradient, so the gradient's scale shows)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    schedule = PlainSchedule(optimizer, LR, LR, 0, 1, len(batches), accum)
    args = argparse.Namespace(accum_iter=accum, batch_size=len(batches[0]), print_freq=1000, mask_ratio=0.75,
                              amp='none')
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    torch.manual_seed(1)  # the masks: torch.rand(4, L) draws what two torch.rand(2, L) draw
    train_one_epoch(ModelHandle(model, lambda m: m), loader, optimizer, torch.device('cpu'), 0, None, schedule,
                    args)


@pytest.mark.parametrize('accum', [2, 4])
def test_an_accumulated_step_equals_one_step_on_the_whole_batch(accum):
    """accum_iter micro-batches make the update of one batch of them all: each micro-batch's loss
    is divided by accum_iter (every micro-batch masks as many patches, so the mean of their losses
    is the whole batch's loss)."""
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch16(img_size=32)
    start = copy.deepcopy(model.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    one_epoch(model, [images], accum=1)
    whole = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    one_epoch(model, list(images.chunk(accum)), accum=accum)

    moved = [k for k in whole if not torch.equal(whole[k], start[k])]
    assert len(moved) > 100  # the step trained the model
    for k in moved:
        torch.testing.assert_close(model.state_dict()[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)
