"""Pretrained encoder weights -> a models_vit classifier (fine-tuning, linear probe, kNN).

Accepts run_pretrain.py's checkpoints and LocalMIM's released ones: the model under 'model'
with upstream parameter names. The encoder part (`patch_embed.proj.*`, `cls_token`,
`pos_embed`, `blocks.N.*`) is kept; pretraining-only entries are dropped: LocalMIM's tap norms
`norm.J.*`, decoders `decoder.J.*`, HOG layers `hog_enc.J.*` (and MAE's `decoder_*`,
`mask_token`). The classifier's `head` and the norm its read-out uses (`fc_norm` with global
pooling, `norm` with the cls token) keep their init: the tap norm on the last block (`norm.3`)
is dropped with the others, as upstream's fine-tuning does (its keys do not match `norm.*`).

Anything that is not such a checkpoint stops the run with `error: ...` (a SystemExit), never a
traceback.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from util import checkpoint
from util.pos_embed import resize_pos_embed

# entries of a pretraining checkpoint that have no counterpart in the classifier
PRETRAIN_ONLY = re.compile(r'^(norm\.\d+\.|decoder\.|hog_enc\.|decoder_|mask_token$)')
# classifier entries that a pretraining checkpoint does not have
HEAD_SIDE = ('head.', 'fc_norm.', 'norm.')


def written_by(state: dict[str, Any]) -> str | None:
    """Which script's checkpoint a model state dict is, from its entries: run_pretrain.py (the
    LocalMIM decoders and HOG layers), run_linprobe.py (a BatchNorm + Linear head) or
    run_finetune.py (a Linear head); None for anything else."""
    keys = [k.removeprefix('module.') for k in state]
    if any(PRETRAIN_ONLY.match(k) for k in keys):
        return 'run_pretrain.py'
    if 'head.1.weight' in keys:
        return 'run_linprobe.py'
    return 'run_finetune.py' if 'head.weight' in keys else None


def _fail(message: str) -> None:
    raise checkpoint.CheckpointError(message)


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    pos_embed_resized: tuple[int, int] | None = None  # (old grid, new grid)
    head_initialised: bool = False


def _pretrained_model(ckpt: dict[str, Any]) -> str | None:
    """The --model the checkpoint's own args name, when it has them."""
    args = ckpt.get('args')
    model = args.get('model') if isinstance(args, dict) else getattr(args, 'model', None)
    return model if isinstance(model, str) else None


def _model_advice(ckpt: dict[str, Any]) -> str:
    """Which --model to choose: the classifier name of the one the checkpoint records, else the rule."""
    pretrained = _pretrained_model(ckpt)
    if pretrained:
        return f'use --model {pretrained.removeprefix("MIM_")} (the checkpoint was pretrained as {pretrained})'
    return 'choose the --model the encoder was pretrained as (MIM_vit_X -> vit_X)'


def _describe(ckpt: dict[str, Any]) -> str:
    """'pretrained as X, epoch N' from the checkpoint's own args, when it has them."""
    model = _pretrained_model(ckpt)
    parts = [f'pretrained as {model}'] if model else []
    if 'epoch' in ckpt:
        parts.append(f'epoch {ckpt["epoch"]}')
    return ', '.join(parts)


def encoder_state_dict(ckpt: Any, path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's encoder entries, and the names of the dropped pretraining-only ones."""
    if not isinstance(ckpt, dict):
        _fail(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict; --finetune expects a '
              'pretraining checkpoint (run_pretrain.py\'s checkpoint-N.pth or a LocalMIM release)')
    if 'model' not in ckpt:
        keys = ', '.join(list(map(str, ckpt))[:8]) or 'nothing'
        _fail(f'{path} has no "model" entry (it holds: {keys}); --finetune expects a pretraining '
              'checkpoint with the weights under "model" (run_pretrain.py\'s checkpoint-N.pth or a '
              'LocalMIM release)')
    state = ckpt['model']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        _fail(f'{path}: the "model" entry is not a state dict of tensors')
    if state and all(k.startswith('module.') for k in state):  # saved from a DDP wrapper
        state = {k[len('module.'):]: v for k, v in state.items()}
    if 'patch_embed.proj.weight' not in state or not any(k.startswith('blocks.') for k in state):
        keys = ', '.join(list(state)[:6])
        _fail(f'{path} is not a ViT encoder checkpoint: no patch_embed.proj.weight / blocks.N.* entries '
              f'(first entries: {keys})')
    dropped = [k for k in state if PRETRAIN_ONLY.match(k)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def load_pretrained_encoder(model: nn.Module, path: str | Path, head_init_std: float,
                            model_name: str = 'the model') -> LoadReport:
    """Load the encoder of checkpoint `path` into `model` (a models_vit.VisionTransformer).

    The position embedding is resized when the checkpoint's token grid differs from the
    model's. Only the read-out (`head`, and `fc_norm` or `norm`) may be missing; the head is
    always initialised afresh with trunc_normal(std=head_init_std), bias 0 (a fine-tuned
    checkpoint's head is ignored, as upstream re-initialises it).
    """
    ckpt = checkpoint.load(path)
    state, dropped = encoder_state_dict(ckpt, path)
    about = _describe(ckpt)
    print(f'loading encoder from {path}' + (f' ({about})' if about else ''))
    target = model.state_dict()

    w, tw = state['patch_embed.proj.weight'], target['patch_embed.proj.weight']
    if w.shape != tw.shape:
        _fail(f'{path}: its patch embedding has width {w.shape[0]} and patch {w.shape[-1]}, but {model_name} '
              f'has width {tw.shape[0]} and patch {tw.shape[-1]}; {_model_advice(ckpt)}')
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    if depth != len(model.blocks):
        _fail(f'{path}: the encoder has {depth} blocks, {model_name} has {len(model.blocks)}; {_model_advice(ckpt)}')

    report = LoadReport(dropped=dropped)
    # a fine-tuned checkpoint's classifier is not part of the encoder: the head always starts afresh
    # (as upstream's fine-tuning and linear probing re-initialise it), and kNN models have none
    old_head = [k for k in ('head.weight', 'head.bias') if state.pop(k, None) is not None]
    if old_head:
        print(f'ignoring the checkpoint\'s classifier ({", ".join(old_head)}): '
              + ('the head is initialised afresh' if 'head.weight' in target else 'only the encoder is used'))

    pos = state.get('pos_embed')
    if pos is not None and pos.shape != target['pos_embed'].shape:
        prefix = 1  # cls token
        old_patches = pos.shape[1] - prefix
        old_grid = int(round(old_patches ** 0.5))
        if pos.ndim != 3 or old_grid * old_grid != old_patches or pos.shape[-1] != target['pos_embed'].shape[-1]:
            _fail(f'{path}: pos_embed {tuple(pos.shape)} is not a square token grid plus a cls token of width '
                  f'{target["pos_embed"].shape[-1]}')
        new_grid = model.patch_embed.grid_size[0]
        state['pos_embed'] = resize_pos_embed(pos, prefix, new_grid)
        report.pos_embed_resized = (old_grid, new_grid)
        print(f'position embedding interpolated from {old_grid}x{old_grid} to {new_grid}x{new_grid} tokens')

    wrong = [f'{k} {tuple(v.shape)} vs {tuple(target[k].shape)}' for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    if wrong:
        _fail(f'{path}: shapes do not match {model_name}: ' + '; '.join(wrong[:5]))
    encoder_missing = [k for k in target if k not in state and not k.startswith(HEAD_SIDE)]
    if encoder_missing:
        _fail(f'{path} lacks encoder weights of {model_name}: {", ".join(encoder_missing[:8])}'
              + (' ...' if len(encoder_missing) > 8 else ''))

    result = model.load_state_dict(state, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    print(f'dropped pretraining-only entries: {len(dropped)} ({", ".join(sorted({k.split(".")[0] for k in dropped}))})'
          if dropped else 'dropped pretraining-only entries: none')
    readout = report.missing and all(k.startswith(HEAD_SIDE) for k in report.missing)
    print(f'missing keys (left at init{": the read-out, which pretraining does not train" if readout else ""}): '
          f'{report.missing}')
    print(f'unexpected keys (ignored): {report.unexpected}')
    if 'head.weight' in report.missing:
        trunc_normal_(model.head.weight, std=head_init_std)
        nn.init.zeros_(model.head.bias)
        report.head_initialised = True
    return report
