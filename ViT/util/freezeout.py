"""FreezeOut (Brock et al., 2017) for LocalMIM: the policy in one place.

Layers i = 0..L-1 (L = depth + 1): 0 is the patch embedding + cls_token, i = b+1 is blocks[b].

    t_i      = s(t_0 + (1 - t_0) * i / (L - 1)),  s(x) = x, x**2 or x**3     (fraction of the run)
    T        = epochs * optimizer steps per epoch
    freeze_i = ceil(t_i * T)                       first optimizer step (0-based) at which i is frozen
    peak_i   = lr / t_i with scale_lr, else lr
    lr_i(s)  = peak_i * s / W                               s < W (W = warmup_epochs x steps per epoch)
             = peak_i * (1 + cos(pi * (s - W) / (t_i * T - W))) / 2     W <= s < freeze_i
             = 0, frozen                                    s >= freeze_i

Each LocalMIM tap's decoder and norm follow the block it reads (decoder_freeze 'tap': dropped
with it) or train to the end with the last layer's schedule ('never').

Everything above is a pure function of the step; `FreezeOut` applies it to a model and an
optimizer once per optimizer step. All ranks compute the same events from the same step, so
distributed runs need no communication to agree.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: the parsers and the study's launcher read this module without torch
    import torch
    import torch.nn as nn

SCALE_FUNCTIONS: dict[str, Callable[[float], float]] = {
    'linear': lambda x: x,
    'squared': lambda x: x ** 2,
    'cubic': lambda x: x ** 3,
}
DECODER_FREEZE_MODES = ('tap', 'never')


class FreezeOutConfigError(SystemExit):
    def __init__(self, message: str):
        super().__init__('error: ' + message)


# ---- pure functions ------------------------------------------------------------------------
def freeze_fractions(num_layers: int, t_0: float, how_scale: str) -> list[float]:
    """t_i for i = 0..L-1; the last layer has t = 1 and trains to the end."""
    s = SCALE_FUNCTIONS[how_scale]
    if num_layers == 1:
        return [1.0]
    return [s(t_0 + (1.0 - t_0) * i / (num_layers - 1)) for i in range(num_layers)]


def freeze_step(t: float, total_steps: int) -> int:
    """First optimizer step (0-based) at which a layer with fraction t is frozen: ceil(t * T).
    Rounded to 1e-9 first so that t = 0.5, T = 10 gives 5, not 6, under float error."""
    return int(math.ceil(round(t * total_steps, 9)))


def peak_lr(lr: float, t: float, scale_lr: bool) -> float:
    return lr / t if scale_lr else lr


def layer_lr(step: int, total_steps: int, warmup_steps: float, peak: float, t: float) -> float:
    """Learning rate of a layer with fraction t and peak lr `peak` at optimizer step `step`."""
    if step >= freeze_step(t, total_steps):
        return 0.0
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = t * total_steps - warmup_steps
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def num_frozen_at(step: int, freeze_steps: list[int]) -> int:
    """How many leading layers are frozen at `step` (t_i increases with i, so always a prefix)."""
    return sum(1 for s in freeze_steps if step >= s)


def layers_frozen(n: int) -> str:
    """'1 layer frozen', '3 layers frozen': the console's wording of a frozen count."""
    return f'{n} layer{"" if n == 1 else "s"} frozen'


def validate(t_0: float, how_scale: str, decoder_freeze: str, warmup_epochs: float, epochs: int) -> None:
    """Stop with a message, before any work, on values the schedule cannot honour."""
    if not 0.0 < t_0 <= 1.0:
        raise FreezeOutConfigError(f'--t_0 must be in (0, 1], got {t_0}')
    if how_scale not in SCALE_FUNCTIONS:
        raise FreezeOutConfigError(f'--how_scale must be one of {", ".join(SCALE_FUNCTIONS)}, got {how_scale}')
    if decoder_freeze not in DECODER_FREEZE_MODES:
        raise FreezeOutConfigError(f'--decoder_freeze must be tap or never, got {decoder_freeze}')
    first = SCALE_FUNCTIONS[how_scale](t_0)
    warmup_fraction = warmup_epochs / epochs
    if first <= warmup_fraction:
        raise FreezeOutConfigError(
            f'the first layer would freeze at {first:.3f} of the run ({how_scale}({t_0})), '
            f'{"inside" if first < warmup_fraction else "at the end of"} the warmup ({warmup_epochs} of {epochs} '
            f'epochs = {warmup_fraction:.3f}), before its cosine could start; raise --t_0, '
            f'use a gentler --how_scale or shorten --warmup_epochs')


# ---- parameter ownership -------------------------------------------------------------------
def param_layer(name: str) -> int | None:
    """Encoder layer that owns a parameter, by upstream's names; None if not an encoder layer."""
    if name.startswith('patch_embed.') or name == 'cls_token':
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return None


def param_tap(name: str) -> int | None:
    """LocalMIM tap (decoder / norm index J) that owns a parameter, else None."""
    if name.startswith(('decoder.', 'norm.')):
        return int(name.split('.')[1])
    return None


def schedule_layer(name: str, tap_layers: list[int], decoder_freeze: str, num_layers: int) -> int:
    """The layer whose lr schedule a trainable parameter follows."""
    layer = param_layer(name)
    if layer is not None:
        return layer
    tap = param_tap(name)
    if tap is not None and decoder_freeze == 'tap':
        return tap_layers[tap]
    return num_layers - 1  # decoders kept to the end ('never') and anything else: last layer


@dataclass(frozen=True)
class FreezeOutSchedule:
    """The whole schedule for one run: fractions, freeze steps and peak lrs per layer."""
    num_layers: int
    total_steps: int
    warmup_steps: float
    t: tuple[float, ...]
    freeze_steps: tuple[int, ...]
    peaks: tuple[float, ...]
    tap_layers: tuple[int, ...]
    decoder_freeze: str
    # the settings it was built from, for freezeout_schedule.json (None: built from fractions directly)
    t_0: float | None = None
    how_scale: str | None = None
    scale_lr: bool | None = None
    run_lr: float | None = None  # the run's lr (peak before FreezeOut's scaling)

    @classmethod
    def build(cls, num_layers: int, tap_layers: list[int], lr: float, t_0: float, how_scale: str,
              scale_lr: bool, decoder_freeze: str, epochs: int, steps_per_epoch: int,
              warmup_epochs: float) -> 'FreezeOutSchedule':
        validate(t_0, how_scale, decoder_freeze, warmup_epochs, epochs)
        total = epochs * steps_per_epoch
        t = freeze_fractions(num_layers, t_0, how_scale)
        return cls(num_layers=num_layers, total_steps=total, warmup_steps=warmup_epochs * steps_per_epoch,
                   t=tuple(t), freeze_steps=tuple(freeze_step(x, total) for x in t),
                   peaks=tuple(peak_lr(lr, x, scale_lr) for x in t), tap_layers=tuple(tap_layers),
                   decoder_freeze=decoder_freeze, t_0=t_0, how_scale=how_scale, scale_lr=scale_lr, run_lr=lr)

    def lr(self, layer: int, step: int) -> float:
        return layer_lr(step, self.total_steps, self.warmup_steps, self.peaks[layer], self.t[layer])

    def num_frozen(self, step: int) -> int:
        return num_frozen_at(step, list(self.freeze_steps))

    def live_taps(self, step: int) -> list[int]:
        if self.decoder_freeze == 'never':
            return list(range(len(self.tap_layers)))
        k = self.num_frozen(step)
        return [j for j, layer in enumerate(self.tap_layers) if layer >= k]

    def table(self, param_prefixes: dict[int, list[str]]) -> dict:
        """The schedule as written to freezeout_schedule.json."""
        settings = {'t_0': self.t_0, 'how_scale': self.how_scale, 'scale_lr': self.scale_lr, 'lr': self.run_lr}
        return {**{k: v for k, v in settings.items() if v is not None},
                'total_steps': self.total_steps, 'warmup_steps': self.warmup_steps,
                'decoder_freeze': self.decoder_freeze,
                'layers': [{'index': i, 't': self.t[i], 'freeze_step': self.freeze_steps[i],
                            'peak_lr': self.peaks[i], 'params': param_prefixes.get(i, [])}
                           for i in range(self.num_layers)]}


def param_prefixes(model: nn.Module, schedule: FreezeOutSchedule) -> dict[int, list[str]]:
    """Layer -> module-name prefixes of the parameters that follow its schedule."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and param_layer(name) is None:
            continue  # fixed tables (pos_embed, HOG filters)
        layer = schedule_layer(name, list(schedule.tap_layers), schedule.decoder_freeze, schedule.num_layers)
        parts = name.split('.')
        prefix = '.'.join(parts[:2]) if parts[0] in ('blocks', 'decoder', 'norm') else parts[0]
        if prefix not in out.setdefault(layer, []):
            out[layer].append(prefix)
    return out


def format_table(table: dict) -> str:
    built_from = (f'{table["how_scale"]} t_0 {table["t_0"]:g}, lr {table["lr"]:.3e} '
                  f'{"scaled by 1/t" if table["scale_lr"] else "unscaled"}, ' if 't_0' in table else '')
    lines = [f'FreezeOut schedule: {built_from}{table["total_steps"]} optimizer steps, warmup '
             f'{table["warmup_steps"]:g} steps, decoders: {table["decoder_freeze"]}',
             f'{"layer":>5} {"t":>7} {"freeze_step":>11} {"peak_lr":>10}  params']
    for row in table['layers']:
        frozen = row['freeze_step'] if row['freeze_step'] < table['total_steps'] else 'never'
        lines.append(f'{row["index"]:>5} {row["t"]:>7.4f} {frozen:>11} {row["peak_lr"]:>10.3e}  '
                     f'{", ".join(row["params"])}')
    return '\n'.join(lines)


def write_table(table: dict, output_dir: str | Path) -> Path:
    path = Path(output_dir) / 'freezeout_schedule.json'
    path.write_text(json.dumps(table, indent=1))
    return path


# ---- the applier ---------------------------------------------------------------------------
class FreezeOut:
    """Applies a FreezeOutSchedule: sets each param group's lr (groups carry a 'layer' key) and,
    at a freeze event, freezes the prefix in the model and frees the optimizer state of its
    parameters. `on_step` returns True when the set of trainable parameters changed (the caller
    then rebuilds its DDP wrapper so frozen parameters are no longer all-reduced)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: FreezeOutSchedule):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.num_frozen = 0
        self.live_taps = list(range(len(schedule.tap_layers)))

    def on_step(self, step: int) -> bool:
        for group in self.optimizer.param_groups:
            group['lr'] = self.schedule.lr(group['layer'], step)
        num_frozen = self.schedule.num_frozen(step)
        live_taps = self.schedule.live_taps(step)
        if num_frozen == self.num_frozen and live_taps == self.live_taps:
            return False
        self.model.set_frozen(num_frozen, live_taps)
        for group in self.optimizer.param_groups:
            for p in group['params']:
                if not p.requires_grad:
                    self.optimizer.state.pop(p, None)  # Adam moments of frozen weights: freed
        self.num_frozen, self.live_taps = num_frozen, live_taps
        return True

    def layer_lrs(self) -> dict[int, float]:
        out = {}
        for group in self.optimizer.param_groups:
            out.setdefault(group['layer'], group['lr'])
        return out
