"""Layer-wise lr decay (ELECTRA / BEiT, as used by MAE and LocalMIM fine-tuning).

A parameter in layer i trains with lr * layer_decay ** (num_layers - i), num_layers = depth + 1:
the embedding (patch_embed, cls_token, pos_embed) is layer 0, blocks.i is layer i + 1, and
everything after the blocks (norm, fc_norm, head) is layer num_layers (full lr). The scale is
stored as the group's 'lr_scale', which util.lr_sched applies at every lr update.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from util.optim import skips_weight_decay

EMBEDDING_NAMES = ('cls_token', 'pos_embed', 'reg_token', 'dist_token')


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer index of a ViT parameter name (see the module docstring)."""
    if name in EMBEDDING_NAMES or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05,
                     no_weight_decay_list: Iterable[str] = (), layer_decay: float = 0.75) -> list[dict]:
    """Trainable parameters grouped by (layer, decay or not). Each group has 'lr_scale',
    'weight_decay', 'layer', 'params' and 'param_names'. No weight decay for 1-D tensors, biases
    and the names in `no_weight_decay_list` (pos_embed, cls_token)."""
    skip = set(no_weight_decay_list)
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = skips_weight_decay(name, p) or name in skip
        layer = layer_id_for_vit(name, num_layers)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {'lr_scale': layer_decay ** (num_layers - layer), 'layer': layer,
                           'weight_decay': 0.0 if no_decay else weight_decay,
                           'params': [], 'param_names': []}
        groups[key]['params'].append(p)
        groups[key]['param_names'].append(name)
    # fixed order: identical layout on every rank and every run (optimizer state resumes)
    return [groups[k] for k in sorted(groups)]


def describe_groups(groups: list[dict]) -> str:
    """One line per group, for the console."""
    lines = []
    for g in groups:
        names = g['param_names']
        shown = ', '.join(names[:3]) + (f', ... ({len(names)} tensors)' if len(names) > 3 else '')
        lines.append(f'  layer {g["layer"]:2d}  lr_scale {g["lr_scale"]:.4f}  wd {g["weight_decay"]:g}  {shown}')
    return '\n'.join(lines)
