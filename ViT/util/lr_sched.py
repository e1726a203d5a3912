"""Learning-rate schedules as pure functions of training progress (in epochs, fractional)."""
from __future__ import annotations

import math

import torch


def warmup_cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float,
                     epochs: float) -> float:
    """Upstream's schedule: linear warmup from 0 to lr over warmup_epochs, then a half-cycle
    cosine from lr down to min_lr at `epochs`."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_steps_per_epoch(batches: int, accum_iter: int) -> int:
    """batches // accum_iter: the micro-batches left over at an epoch's end cannot complete a step
    and are skipped (said once here, as the epoch lines count only those trained); a stop with a
    message when not even one step fits."""
    steps, left_over = divmod(batches, accum_iter)
    if steps == 0:
        raise SystemExit(f'error: {batches} batches per epoch is fewer than --accum_iter {accum_iter}')
    if left_over:
        last = f'the last {left_over} batches are' if left_over > 1 else 'the last batch is'
        print(f'note: {batches} batches per epoch make {steps} optimizer steps of --accum_iter {accum_iter}; '
              f'{last} skipped each epoch')
    return steps


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets lr, times its 'lr_scale' where it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Upstream-compatible entry point: sets and returns the lr for fractional `epoch`."""
    lr = warmup_cosine_lr(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    set_group_lrs(optimizer, lr)
    return lr


class PlainSchedule:
    """Upstream LocalMIM's schedule, applied once per optimizer step (per iteration, not per
    epoch), at upstream's fractional epoch: epoch + (index of the step's first micro-batch) /
    batches_per_epoch, i.e. step / steps_per_epoch when accum_iter divides the epoch. Same hook
    as FreezeOut; never freezes."""

    num_frozen = 0

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float,
                 warmup_epochs: float, epochs: int, batches_per_epoch: int, accum_iter: int = 1):
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs
        self.batches_per_epoch, self.accum_iter = batches_per_epoch, accum_iter
        self.steps_per_epoch = batches_per_epoch // accum_iter  # left-over micro-batches are skipped

    def lr_at(self, step: int) -> float:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        progress = epoch + step_in_epoch * self.accum_iter / self.batches_per_epoch
        return warmup_cosine_lr(progress, self.lr, self.min_lr, self.warmup_epochs, self.epochs)

    def on_step(self, step: int) -> bool:
        set_group_lrs(self.optimizer, self.lr_at(step))
        return False

    def layer_lrs(self) -> dict[int, float]:
        return {}
