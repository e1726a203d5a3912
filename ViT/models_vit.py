"""ViT classifiers for fine-tuning, linear probing and kNN on LocalMIM encoders.

timm's VisionTransformer with MAE's two read-outs, chosen by `global_pool`:
  * True  (fine-tuning default): mean of the patch tokens after the last block (cls token
    excluded), then its own LayerNorm `fc_norm`; the final `norm` is not applied.
  * False (--cls_token): the cls token after the final `norm`.
Parameter names are timm's, which are also the pretraining encoder's (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.*`), so pretraining checkpoints load by name. The read-out
is written out here rather than left to timm's `global_pool` string, whose pooling details
have changed between timm releases.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import timm.models.vision_transformer

from util.flags import VIT_MODELS


class VisionTransformer(timm.models.vision_transformer.VisionTransformer):
    """timm ViT with MAE's read-out (see the module docstring)."""

    def __init__(self, global_pool: bool = True, **kwargs):
        # timm builds `norm` (token mode) or `fc_norm` (avg mode) for us; the other is Identity,
        # so state dicts hold exactly the norm the read-out uses.
        super().__init__(global_pool='avg' if global_pool else 'token', fc_norm=global_pool,
                         class_token=True, **kwargs)
        self.use_global_pool = bool(global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens after the blocks (B, 1 + L, D); `norm` applied only in
        cls-token mode."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        return x if self.use_global_pool else self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.use_global_pool:
            x = self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1))
        else:
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, D) feature the head reads: used by the linear probe and kNN."""
        return self.forward_head(self.forward_features(x), pre_logits=True)


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:
    kwargs.setdefault('img_size', 224)
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 192, 12, 3, **kwargs)


def vit_small_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 384, 12, 6, **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 768, 12, 12, **kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 1024, 24, 16, **kwargs)


def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit(14, 1280, 32, 16, **kwargs)


MODELS = {name: globals()[name] for name in VIT_MODELS}  # the names --model offers (util.flags)


def check_model(name: str, img_size: int = 224) -> None:
    """A clear SystemExit for an unknown --model (e.g. a pretraining name) or an --input_size
    that is not a multiple of its patch size."""
    if name not in MODELS:
        hint = ''
        if name.startswith('MIM_') and name[4:] in MODELS:
            hint = f' (pretraining name; the classifier is --model {name[4:]})'
        raise SystemExit(f'error: unknown --model {name}{hint}; choose one of: {", ".join(sorted(MODELS))}')
    patch = 14 if name.endswith('patch14') else 16
    if img_size < patch or img_size % patch:
        raise SystemExit(f'error: --input_size {img_size} is not a positive multiple of the patch size {patch}')


def build_model(name: str, **kwargs) -> VisionTransformer:
    """Constructor by name, checked by check_model."""
    check_model(name, kwargs.get('img_size', 224))
    return MODELS[name](**kwargs)
