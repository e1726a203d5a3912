"""Loops shared by fine-tuning, linear probing and kNN: one training epoch, evaluation,
feature extraction, and the epoch loop with checkpoints and log lines.

As in pretraining, the host waits for the device only when a console line is printed and
at the end of an epoch or evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine_pretrain import ModelHandle, autocast_context
from util import checkpoint, dist
from util.log import EpochProgress, RunEta, append_json_line, format_seconds, start_line
from util.optim import backward, optimizer_step


def train_one_epoch(handle: ModelHandle, criterion: Callable, data_loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, schedule, args: argparse.Namespace,
                    mixup_fn: Callable | None = None, log_writer=None) -> dict[str, float]:
    """`len(data_loader) // accum_iter` optimizer steps; the lr is set per step by `schedule`
    (util.lr_sched.PlainSchedule, which honours each group's lr_scale). Gradients are clipped
    to --clip_grad (after unscaling) when it is given. Returns epoch means for log.txt."""
    handle.module.train(True)
    accum = args.accum_iter
    steps = len(data_loader) // accum
    max_norm = getattr(args, 'clip_grad', None)
    print_freq = max(getattr(args, 'print_freq', 50), 1)
    params = [p for p in handle.module.parameters() if p.requires_grad]
    progress = EpochProgress(epoch, steps * accum, print_freq)
    world = dist.get_world_size()

    optimizer.zero_grad(set_to_none=True)
    iterator = iter(data_loader)
    for it in range(steps * accum):
        samples, targets = progress.next_batch(iterator)
        step_in_epoch, micro = divmod(it, accum)
        if micro == 0:
            schedule.on_step(epoch * steps + step_in_epoch)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = micro == accum - 1
        # DDP all-reduces gradients only on the micro-batch that completes a step
        with (contextlib.nullcontext() if update else handle.no_sync()):
            with autocast_context(device, args.amp):
                outputs = handle.call(samples)
            loss = criterion(outputs.float(), targets)
            backward(loss / accum, loss_scaler)
        grad_norm = optimizer_step(optimizer, loss_scaler, params, max_norm) if update else None
        lr = max(g['lr'] for g in optimizer.param_groups)  # the step's lr (layer decay: the top group's)
        progress.update(samples.shape[0] * world, lr, loss=loss.detach(),
                        window_only={'grad_norm': grad_norm} if grad_norm is not None else None)

        if progress.due(it):
            m = progress.report(it)
            norm = f'  grad norm {m["grad_norm"]:.3f}' if 'grad_norm' in m else ''
            print(f'Epoch [{epoch}] [{it + 1}/{steps * accum}]  eta {format_seconds(m["eta_s"])}  '
                  f'loss {m["loss"]:.4f}  lr {lr:.3e}{norm}  {m["images_per_s"]:.0f} img/s  '
                  f'data wait {m["data_wait_share"]:.0%}', flush=True)  # RandAugment on the CPU can bound a step
            if log_writer is not None:
                x = int((it / len(data_loader) + epoch) * 1000)  # upstream's epoch_1000x axis
                log_writer.add_scalar('loss', m['loss'], x)
                log_writer.add_scalar('lr', lr, x)
                log_writer.add_scalar('perf/images_per_s', m['images_per_s'], x)
                log_writer.add_scalar('perf/data_wait_s', m['data_wait_s'], x)

    return progress.epoch_stats()


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the k highest scores, for each k (k is capped at
    the number of classes, so top-5 on a 4-class set is top-4)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = top.eq(targets[:, None])
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, amp: str = 'none',
             sharded: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over the loader's samples.

    `model` should be the unwrapped module: evaluation needs no DDP, and shards may differ in
    size. With `sharded`, each process saw its own share (util.data.ShardSampler) and the sums
    are added over processes."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    top = 5
    for samples, targets in data_loader:
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(samples)
        logits = logits.float()
        top = min(5, logits.shape[1])  # top-5 on fewer classes is top-<classes>
        c1, c5 = topk_correct(logits, targets)
        sums += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(),
                             c1.double(), c5.double(), torch.tensor(float(len(targets)), device=device,
                                                                     dtype=torch.float64)])
    if sharded and dist.is_dist():
        sums = dist.all_reduce_sum(sums)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    stats = {'acc1': 100.0 * c1 / n, 'acc5': 100.0 * c5 / n, 'loss': loss / n, 'num_samples': int(n)}
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@{top} {stats["acc5"]:.3f} loss {stats["loss"]:.3f} '
          f'({stats["num_samples"]} images)', flush=True)
    return stats


def _all_gather_rows(x: torch.Tensor) -> list[torch.Tensor]:
    """Each process's (n_r, ...) tensor, on every process (sizes may differ)."""
    if not dist.is_dist():
        return [x]
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, sizes)]


def gather_in_dataset_order(feats: torch.Tensor, labels: torch.Tensor, sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's share (drawn by `sampler`, e.g. util.data.ShardSampler), collected on every
    process and put back in dataset order."""
    if not dist.is_dist():
        return feats, labels
    indices = torch.tensor(list(sampler), dtype=torch.long, device=feats.device)
    all_idx = torch.cat(_all_gather_rows(indices))
    order = torch.argsort(all_idx)
    return torch.cat(_all_gather_rows(feats))[order], torch.cat(_all_gather_rows(labels))[order]


@torch.no_grad()
def extract_features(forward: Callable[[torch.Tensor], torch.Tensor], data_loader, device: torch.device,
                     feature_dim: int, amp: str = 'none', gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D = feature_dim), labels (N,)) of this process's samples in loader
    order, or with `gather` of all processes' samples in dataset order. A process with no
    samples (a split smaller than the process count) returns (0, D)."""
    feats, labels = [], []
    for samples, targets in data_loader:
        with autocast_context(device, amp):
            f = forward(samples.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(targets.to(device))
    feats = torch.cat(feats) if feats else torch.zeros(0, feature_dim, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return gather_in_dataset_order(feats, labels, data_loader.sampler) if gather else (feats, labels)


# ---- the epoch loop of fine-tuning and linear probing ------------------------------------------

def logged_accuracies(output_dir: str | None) -> dict[int, float]:
    """test_acc1 of each epoch that has a line in log.txt (--eval lines have no epoch)."""
    path = Path(output_dir or '') / 'log.txt'
    accuracies: dict[int, float] = {}
    if output_dir and path.is_file():
        for line in path.read_text(encoding='utf-8').splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and 'test_acc1' in rec and isinstance(rec.get('epoch'), int):
                accuracies[rec['epoch']] = float(rec['test_acc1'])
    return accuracies


def best_accuracy_so_far(output_dir: str | None, before_epoch: int) -> float:
    """Highest test_acc1 of the epochs already in log.txt (for a resumed run's best checkpoint)."""
    return max((acc for epoch, acc in logged_accuracies(output_dir).items() if epoch < before_epoch), default=0.0)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (e.g. the probe's BatchNorm statistics) on every rank. DDP copies them only
    at the start of each forward, so after the last training step ranks differ; evaluation and the
    checkpoint (rank 0's) should see the same model."""
    if dist.is_dist():
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)


def fit(handle: ModelHandle, criterion: Callable, train_loader, val_loader, optimizer, schedule, loss_scaler,
        device: torch.device, args: argparse.Namespace, start_epoch: int, n_parameters: int,
        save_checkpoint: Callable, mixup_fn: Callable | None = None, log_writer=None,
        checkpoint_extra: dict | None = None, unevaluated: tuple[Path, dict] | None = None) -> dict[str, float]:
    """Train from start_epoch to args.epochs. After each epoch: checkpoint-last.pth (via
    `save_checkpoint(args, model, optimizer, loss_scaler, epoch, extra=...)`, which says whether it
    saved this epoch) with the epoch's training record, then evaluation, one log.txt line, and
    checkpoint-best.pth when top-1 improved. The checkpoint comes first so that a run stopped during
    the evaluation (Ctrl-C, a val image that cannot be decoded) keeps the epoch's training; resumed,
    it passes `unevaluated` = (that checkpoint, its training record) and the epoch is evaluated
    first. Returns the last epoch's log record. `checkpoint_extra`: more top-level checkpoint
    entries (the classes)."""
    sharded = args.dist_eval and dist.get_world_size() > 1
    out = Path(args.output_dir) if args.output_dir else None
    max_accuracy = best_accuracy_so_far(args.output_dir, start_epoch)
    eta = RunEta(args.epochs)

    def close_epoch(epoch: int, train_stats: dict, saved_at: Path | None, epoch_start: float | None) -> dict:
        """Evaluation, console line, tensorboard, log.txt line and checkpoint-best.pth of a trained
        epoch; `saved_at`: its checkpoint file (None: not saved, the best is written from memory)."""
        nonlocal max_accuracy
        test_stats = evaluate(handle.module, val_loader, device, args.amp, sharded)
        improved = test_stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        timing = ('evaluated on resume' if epoch_start is None
                  else eta.progress(epoch, time.time() - epoch_start))  # training and evaluation
        print(f'Accuracy of the network on the {test_stats["num_samples"]} test images: {test_stats["acc1"]:.1f}%  '
              f'(max {max_accuracy:.2f}%); {timing}')
        if log_writer is not None:
            # on the training curves' epoch_1000x axis, at the epoch's last step (upstream used the epoch
            # number), so a resumed run's purge_step hides exactly the epochs it redoes
            for k in ('acc1', 'acc5', 'loss'):
                log_writer.add_scalar(f'perf/test_{k}', test_stats[k], (epoch + 1) * 1000 - 1)
            log_writer.flush()
        record = {**{f'train_{k}': v for k, v in train_stats.items()},
                  **{f'test_{k}': v for k, v in test_stats.items()},
                  'max_accuracy': max_accuracy, 'epoch': epoch, 'n_parameters': n_parameters}
        append_json_line(args.output_dir, record)
        if out is not None and dist.is_main_process():
            best = out / 'checkpoint-best.pth'
            if improved or not best.is_file():
                if saved_at is not None:
                    checkpoint.keep_copy(saved_at, best)
                else:  # --save_last_freq skipped this epoch: from memory (with rank 0's RNG state only)
                    checkpoint.save_atomic(checkpoint.checkpoint_state(args, handle.module, optimizer, loss_scaler,
                                                                       epoch, [checkpoint.rng_state()],
                                                                       checkpoint_extra), best)
        return record

    record: dict[str, float] = {}
    if unevaluated is not None:
        print(f'epoch {start_epoch - 1} was saved, but the run stopped before its evaluation was logged: '
              f'evaluating {unevaluated[0]} first')
        record = close_epoch(start_epoch - 1, unevaluated[1], unevaluated[0], None)
    if start_epoch >= args.epochs:  # only the last epoch's evaluation was left
        return record
    print(start_line(args.epochs, start_epoch))
    run_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(handle, criterion, train_loader, optimizer, device, epoch, loss_scaler,
                                      schedule, args, mixup_fn, log_writer)
        broadcast_buffers(handle.module)
        saved = save_checkpoint(args, handle.module, optimizer, loss_scaler, epoch,
                                extra={**(checkpoint_extra or {}), 'train_stats': train_stats})
        record = close_epoch(epoch, train_stats, out / 'checkpoint-last.pth' if saved and out else None, epoch_start)
    print(f'Training time {format_seconds(time.time() - run_start)}')
    return record
