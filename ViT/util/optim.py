"""Parameter groups and the AdamW optimizer for pretraining."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Upstream's rule (timm's add_weight_decay): biases and 1-D tensors (norm scales) get none."""
    return param.ndim <= 1 or name.endswith('.bias')


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              layer_of: Callable[[str], int] | None = None) -> list[dict]:
    """Trainable parameters split by weight decay and, when `layer_of` is given, by the layer
    whose lr schedule they follow (groups then carry a 'layer' key). Groups are ordered so the
    layout is the same on every rank and every run."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of(name) if layer_of is not None else -1
        no_decay = skips_weight_decay(name, p)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {'params': [], 'param_names': [], 'weight_decay': 0.0 if no_decay else weight_decay}
            if layer_of is not None:
                groups[key]['layer'] = layer
        groups[key]['params'].append(p)
        groups[key]['param_names'].append(name)
    return [groups[k] for k in sorted(groups)]


def build_adamw(groups: list[dict], lr: float, device: torch.device,
                betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel on GPU (one launch for all tensors of a group)."""
    fused = device.type == 'cuda'
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def backward(loss: torch.Tensor, loss_scaler: torch.amp.GradScaler | None) -> None:
    """loss.backward(), through the GradScaler under fp16."""
    if loss_scaler is not None:
        loss_scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(optimizer: torch.optim.Optimizer, loss_scaler: torch.amp.GradScaler | None,
                   clip_params: list[torch.Tensor] | None = None, max_norm: float | None = None
                   ) -> torch.Tensor | None:
    """Optional gradient clipping (on unscaled gradients), the step, zeroed gradients.
    Returns the gradient norm when clipping (a device tensor: no sync), else None."""
    grad_norm = None
    if max_norm is not None:
        if loss_scaler is not None:
            loss_scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
    if loss_scaler is not None:
        loss_scaler.step(optimizer)
        loss_scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
