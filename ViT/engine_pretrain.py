"""One pretraining epoch: the inner loop, kept flat.

Per optimizer step: one schedule hook (lr, and FreezeOut's freeze events, only at step
boundaries so accumulation is never split), `accum_iter` micro-batches with DDP's gradient
all-reduce only on the last, then the optimizer step. The host waits for the device only
when a console line is printed and at the end of the epoch.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from util import dist
from util import freezeout as fo
from util.log import EpochProgress, format_seconds
from util.optim import backward, optimizer_step

SCALE_NAMES = ['4', '2', '1', '0.5']  # LocalMIM's scales, in tap order


class ModelHandle:
    """The model as trained (`module`) and as called (`call`: DDP and/or torch.compile around
    it). `rewrap` rebuilds the wrapper, e.g. after a freeze event, so DDP only registers (and
    all-reduces) the parameters that still train."""

    def __init__(self, module: nn.Module, wrap: Callable[[nn.Module], nn.Module]):
        self.module, self.wrap = module, wrap
        self.call = wrap(module)

    def rewrap(self) -> None:
        self.call = None  # drop the old DDP reducer before building the new one
        self.call = self.wrap(self.module)

    def no_sync(self):
        ddp = getattr(self.call, '_orig_mod', self.call)  # under torch.compile
        if isinstance(ddp, nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()


def autocast_context(device: torch.device, amp: str):
    if amp == 'none':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_done_line(epoch: int, stats: dict[str, float], progress: str) -> str:
    """The console line that closes an epoch; `progress` from util.log.RunEta.progress."""
    return (f'Epoch [{epoch}] done in {format_seconds(stats["epoch_time"])}: loss {stats["loss"]:.4f}, '
            f'{stats["images_per_s"]:.0f} img/s, data wait {stats["data_wait_s"]:.1f}s; {progress}')


def train_one_epoch(handle: ModelHandle, data_loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, schedule, args,
                    log_writer=None) -> dict[str, float]:
    """Trains `len(data_loader) // accum_iter` optimizer steps (left-over micro-batches that
    could not complete a step are skipped). Returns epoch means for log.txt (the caller prints
    the epoch's closing line)."""
    handle.module.train(True)
    accum = args.accum_iter
    steps = len(data_loader) // accum
    progress = EpochProgress(epoch, steps * accum, args.print_freq)
    images_per_iter = args.batch_size * dist.get_world_size()

    optimizer.zero_grad(set_to_none=True)
    iterator = iter(data_loader)
    for it in range(steps * accum):
        samples, _ = progress.next_batch(iterator)
        step_in_epoch, micro = divmod(it, accum)
        step = epoch * steps + step_in_epoch
        if micro == 0 and schedule.on_step(step):
            handle.rewrap()
            print(f'FreezeOut: step {step}: {fo.layers_frozen(handle.module.num_frozen)}, live taps '
                  f'{[SCALE_NAMES[j] for j in handle.module.live_taps]}')

        samples = samples.to(device, non_blocking=True)
        update = micro == accum - 1
        # DDP all-reduces gradients only on the micro-batch that completes a step
        with (contextlib.nullcontext() if update else handle.no_sync()):
            with autocast_context(device, args.amp):
                loss, terms = handle.call(samples, mask_ratio=args.mask_ratio, return_terms=True)
            backward(loss / accum, loss_scaler)
        if update:
            optimizer_step(optimizer, loss_scaler)
        lr = optimizer.param_groups[-1]['lr']
        progress.update(images_per_iter, lr, loss=loss.detach(),
                        **{f'loss_scale{SCALE_NAMES[k]}': v.detach() for k, v in terms.items()})

        if progress.due(it):
            m = progress.report(it)
            memory = f'  mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G' if device.type == 'cuda' else ''
            print(f'Epoch [{epoch}] [{it + 1}/{steps * accum}]  eta {format_seconds(m["eta_s"])}  '
                  f'loss {m["loss"]:.4f}  lr {lr:.3e}  {m["images_per_s"]:.0f} img/s  '
                  f'data wait {m["data_wait_share"]:.0%}  frozen {handle.module.num_frozen}{memory}', flush=True)
            if log_writer is not None:
                x = int((it / len(data_loader) + epoch) * 1000)  # upstream's epoch_1000x axis
                log_writer.add_scalar('train_loss', m['loss'], x)
                for k, v in m.items():
                    if k.startswith('loss_scale'):
                        log_writer.add_scalar(f'loss/{k}', v, x)
                log_writer.add_scalar('lr', lr, x)
                log_writer.add_scalar('perf/images_per_s', m['images_per_s'], x)
                log_writer.add_scalar('perf/data_wait_s', m['data_wait_s'], x)
                if device.type == 'cuda':
                    log_writer.add_scalar('perf/max_memory_gib', torch.cuda.max_memory_allocated() / 2**30, x)
                for layer, layer_lr in schedule.layer_lrs().items():
                    log_writer.add_scalar(f'freezeout/lr_layer{layer:02d}', layer_lr, x)
                log_writer.add_scalar('freezeout/frozen_layers', handle.module.num_frozen, x)
                log_writer.add_scalar('freezeout/live_taps', len(handle.module.live_taps), x)

    stats = progress.epoch_stats()
    stats.update(frozen_layers=handle.module.num_frozen,
                 live_taps=len(handle.module.live_taps))
    return stats
