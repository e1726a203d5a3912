"""Console meters, tensorboard writer and log.txt lines.

Meters keep running sums as device tensors, so training never waits for the GPU except
when a line is printed or an epoch ends.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

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


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def make_writer(log_dir: str | None):
    """SummaryWriter on rank 0 when --log_dir is given, else None."""
    if not log_dir or not dist.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def append_json_line(output_dir: str | None, record: dict[str, Any], name: str = 'log.txt') -> None:
    if not output_dir or not dist.is_main_process():
        return
    with open(Path(output_dir) / name, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')
