"""Console meters, progress lines of long passes, tensorboard writer and log.txt lines.

Meters keep running sums as device tensors, so training never waits for the GPU except
when a line is printed or an epoch ends.
"""
from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import torch

from util import dist


class DeviceMeans:
    """Running sums of scalar tensors on their device; read (one sync) only on demand."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self, across_ranks: bool = False) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        if across_ranks:
            stacked = dist.all_reduce_mean(stacked)
        return dict(zip(keys, stacked.tolist()))

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def start_line(epochs: int, start_epoch: int) -> str:
    """The line before the first epoch: upstream's, and on a resumed run which epochs are left."""
    if start_epoch == 0:
        return f'Start training for {epochs} epochs'
    return (f'Start training: epochs {start_epoch}-{epochs - 1} of {epochs} '
            f'({epochs - start_epoch} left, epochs numbered from 0)')


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RunEta:
    """Time left in a run: the epochs still to come, each weighted by its estimated cost (1 each by
    default; FLOPs per image for FreezeOut, whose epochs get cheaper as layers freeze), at the time per
    unit of cost of the last WINDOW epochs this process timed. A process's first epoch is left out once
    another is timed: it also waits for the loader workers to start (and for compilation)."""
    WINDOW = 3

    def __init__(self, epochs: int, epoch_costs: Sequence[float] | None = None):
        self.costs = list(epoch_costs) if epoch_costs is not None else [1.0] * epochs
        if len(self.costs) != epochs:
            raise ValueError(f'{len(self.costs)} epoch costs for {epochs} epochs')
        self.timed: list[tuple[int, float]] = []  # (epoch, seconds)

    def seconds_left(self, epoch: int, seconds: float) -> float:
        """Records that `epoch` took `seconds`; returns the estimate for the epochs after it."""
        self.timed.append((epoch, seconds))
        window = (self.timed[1:] if len(self.timed) > 1 else self.timed)[-self.WINDOW:]
        per_cost = sum(s for _, s in window) / max(sum(self.costs[e] for e, _ in window), 1e-30)
        return per_cost * sum(self.costs[epoch + 1:])

    def progress(self, epoch: int, seconds: float) -> str:
        """Records `epoch`'s time; the console's '6 of 10 epochs done, run eta 0:01:02' (no eta after the last)."""
        left = self.seconds_left(epoch, seconds)
        done = f'{epoch + 1} of {len(self.costs)} epochs done'
        return done + (f', run eta {format_seconds(left)}' if epoch + 1 < len(self.costs) else '')


def require_tensorboard() -> type:
    """torch's SummaryWriter class, or one `error:` line when tensorboard is missing (torch does not
    install it; its ImportError would end the run with a traceback)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(f'error: tensorboard is not installed: python3 -m pip install tensorboard (or -r '
                         f'requirements.txt); the --log_dir events need it ({e})') from None
    return SummaryWriter


def make_writer(log_dir: str | None, resumed_at_epoch: int | None = None):
    """SummaryWriter on rank 0 when --log_dir is given, else None. A resumed run hides what an
    interrupted one logged from its resume point on (tensorboard's purge_step on the
    epoch_1000x axis), so no curve shows an epoch twice."""
    if not log_dir or not dist.is_main_process():
        return None
    SummaryWriter = require_tensorboard()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    purge = None if resumed_at_epoch is None else resumed_at_epoch * 1000
    return SummaryWriter(log_dir=log_dir, purge_step=purge)


PROGRESS_EVERY_S = 10.0  # PassProgress's interval: a pass shorter than this prints no progress line


class PassProgress:
    """A loader's batches, passed through, with a line on rank 0 at most every PROGRESS_EVERY_S seconds
    while the pass lasts: `<what> <done>/<total> images (h:mm:ss)`, counting this process's share
    (`of this process` after the count when there are several). For passes that print nothing else
    for minutes (run_knn's feature extraction); the caller prints the closing line. Keeps the
    loader's `sampler` and length, which consumers of the loader read."""

    def __init__(self, loader: torch.utils.data.DataLoader, what: str):
        self.loader, self.what = loader, what
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        total, done = len(self.sampler), 0
        share = ' of this process' if dist.get_world_size() > 1 else ''
        start = last = time.perf_counter()
        for batch in self.loader:
            yield batch  # the consumer's work on the batch counts into the time below
            done += len(batch[0])
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and done < total and dist.is_main_process():
                print(f'{self.what} {done}/{total} images{share} ({format_seconds(now - start)})', flush=True)
                last = now


def append_json_line(output_dir: str | None, record: dict[str, Any], name: str = 'log.txt') -> None:
    if not output_dir or not dist.is_main_process():
        return
    with open(Path(output_dir) / name, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


class EpochProgress:
    """Bookkeeping of one training epoch: running means on the device (per print window and for
    the epoch), images/s, time waiting for data, ETA. The device is read only in `report`,
    every `print_freq` iterations and at the last one."""

    def __init__(self, epoch: int, iterations: int, print_freq: int):
        self.epoch, self.iterations, self.print_freq = epoch, iterations, max(print_freq, 1)
        self.window, self.totals = DeviceMeans(), DeviceMeans()
        self.epoch_start = self.window_start = time.perf_counter()
        self.images = self.window_images = 0
        self.data_wait = self.window_wait = 0.0
        self.lr_sum, self.updates = 0.0, 0

    def next_batch(self, iterator):
        """next(iterator), timing the wait for the input pipeline."""
        start = time.perf_counter()
        batch = next(iterator)
        waited = time.perf_counter() - start
        self.data_wait += waited
        self.window_wait += waited
        return batch

    def update(self, images: int, lr: float, window_only: dict[str, torch.Tensor] | None = None,
               **values: torch.Tensor) -> None:
        """One iteration: its images, the lr it trained with (a host float; the epoch's mean is
        log.txt's train_lr, as upstream's meter) and device values to average."""
        self.window.update(**values, **(window_only or {}))
        self.totals.update(**values)
        self.images += images
        self.window_images += images
        self.lr_sum += lr
        self.updates += 1

    def due(self, it: int) -> bool:
        return (it + 1) % self.print_freq == 0 or it == self.iterations - 1

    def report(self, it: int) -> dict[str, float]:
        """Window means over all ranks (one sync), images/s, data-wait share, ETA; stops the run
        on a non-finite loss (every rank sees the same mean, so all stop together)."""
        means = self.window.means(across_ranks=True)
        if not math.isfinite(means['loss']):
            raise SystemExit(f'error: loss is {means["loss"]} at epoch {self.epoch} iteration {it}; stopping')
        now = time.perf_counter()
        span = max(now - self.window_start, 1e-9)
        means.update(images_per_s=self.window_images / span, data_wait_share=self.window_wait / span,
                     data_wait_s=self.window_wait,
                     eta_s=(now - self.epoch_start) / (it + 1) * (self.iterations - it - 1))
        self.window.reset()
        self.window_images, self.window_wait, self.window_start = 0, 0.0, time.perf_counter()
        return means

    def epoch_stats(self) -> dict[str, float]:
        epoch_time = time.perf_counter() - self.epoch_start
        stats = self.totals.means(across_ranks=True)
        stats.update(epoch_time=epoch_time, images_per_s=self.images / max(epoch_time, 1e-9),
                     data_wait_s=self.data_wait, lr=self.lr_sum / max(self.updates, 1))
        return stats
