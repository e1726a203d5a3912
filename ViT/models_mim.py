"""LocalMIM (Wang et al., CVPR 2023) for ViT, with FreezeOut-ready encoder layers.

Upstream's public names, signatures and parameter names are kept (`MaskedAutoencoderViT`,
`random_masking`, `forward_encoder`, `forward_loss`, `HOG`, `recal_mask`, `forward(imgs,
mask_ratio)` returning the loss; `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N`,
`norm.J`, `decoder.J`, `hog_enc.J`), so released checkpoints load and losses match.

Freezable layers (FreezeOut, see util/freezeout.py): layer 0 is the patch embedding plus
cls_token, layer b+1 is blocks[b]. The model only knows which prefix is frozen and which
taps are live; when and why that changes is the policy's business.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed

from util.flags import MIM_MODELS
from util.hog import HOGLayer, multi_scale_hog
from util.pos_embed import get_2d_sincos_pos_embed


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt's channels-first form)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


LayerNorm = LayerNorm2d  # upstream's name


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)  # as the official JAX ViT
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class MAE_Decoder(nn.Module):
    """One LocalMIM decoder: MAE-style transformer over all tokens, then a head that maps the
    token grid to the HOG grid of its scale (x4 and x2 by transposed convs, x0.5 by pooling)."""

    def __init__(self, inp_dim, embed_dim=256, out_dim=27, scale=1., num_patches=196, depth=1,
                 num_heads=8, mlp_ratio=4., qkv_bias=False, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_patches = num_patches
        self.embed = nn.Linear(inp_dim, embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                           norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        hidden = embed_dim
        if scale == 4.0:
            layers = [nn.ConvTranspose2d(embed_dim, embed_dim // 2, kernel_size=2, stride=2),
                      LayerNorm2d(embed_dim // 2), nn.GELU(),
                      nn.ConvTranspose2d(embed_dim // 2, embed_dim // 4, kernel_size=2, stride=2)]
            hidden = embed_dim // 4
        elif scale == 2.0:
            layers = [nn.ConvTranspose2d(embed_dim, embed_dim // 2, kernel_size=2, stride=2)]
            hidden = embed_dim // 2
        elif scale == 1.0:
            layers = []
        elif scale == 0.5:
            layers = [nn.AvgPool2d(kernel_size=2, stride=2)]
        else:
            raise NotImplementedError(f'scale_factor={scale} is not supported')
        # The head's input is channels-last (the token grid is a transposed view, see forward; the
        # transposed convs keep that layout), and a conv kernel may then return this 1x1 conv's weight
        # gradient channels-last: for a contiguous (27, d, 1, 1) weight the same memory with other
        # strides, which autograd keeps and DDP copies with a warning ('Grad strides do not match bucket
        # view strides'; seen on CPU with several threads). A channels-last weight (same memory) gets its
        # gradient in its own layout.
        layers.append(nn.Conv2d(hidden, out_dim, kernel_size=1).to(memory_format=torch.channels_last))
        self.pred = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self):
        nn.init.normal_(self.mask_token, std=.02)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.num_patches ** .5), cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        self.apply(_init_linear_and_norm)

    def forward(self, x, ids_restore):
        """x (B, 1 + kept, D_enc) -> prediction (B, (grid*scale)**2, out_dim)."""
        x = self.embed(x)
        # put mask tokens at the removed positions and undo the shuffle
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)  # (B, 1 + L, d)
        side = int(self.num_patches ** 0.5)
        x = x[:, 1:].transpose(1, 2).reshape(x.size(0), -1, side, side)  # (B, d, side, side), channels-last
        x = self.pred(x)  # (B, out_dim, side*scale, side*scale)
        return x.flatten(2, 3).transpose(1, 2)


class BlockWithFreezeOut(Block):
    """timm Block that knows its FreezeOut layer index; when inactive it runs without autograd,
    so no graph is recorded through it and backward never reaches it."""

    def __init__(self, *args, layer_index: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_index = layer_index
        self.active = True

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.active:
            return super().forward(x, **kwargs)
        with torch.no_grad():
            return super().forward(x, **kwargs)


def token_grid(img_size: int, patch_size: int) -> int:
    """Side of the token grid; ValueError for a size LocalMIM cannot use."""
    if img_size < 2 * patch_size:
        raise ValueError(f'input size {img_size} is below two patches ({2 * patch_size}): LocalMIM\'s 0.5 scale '
                         f'needs an even token grid of at least 2x2')
    if img_size % patch_size:
        raise ValueError(f'input size {img_size} is not a multiple of the patch size {patch_size}')
    grid = img_size // patch_size
    if grid % 2:
        sizes = ' or '.join(f'--input_size {g * patch_size}' for g in (grid + 1, grid - 1) if g >= 2)
        raise ValueError(f'input size {img_size} with patch {patch_size} gives an odd token grid '
                         f'({grid}x{grid}); LocalMIM\'s 0.5 scale needs an even grid, e.g. {sizes}')
    return grid


class MaskedAutoencoderViT(nn.Module):
    """LocalMIM: ViT encoder; normalised features of blocks ID = [1, 3, depth-3, depth-1] feed
    one decoder each, which predicts HOG at scales [4, 2, 1, 0.5] of the token grid; the loss
    is the sum over scales of the MSE on masked regions."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=nn.LayerNorm, hog_nbins=9, hog_bias=False, **kwargs):
        super().__init__()
        grid = token_grid(img_size, patch_size)
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            BlockWithFreezeOut(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                               layer_index=i + 1) for i in range(depth)])
        self.ID = [1, 3, depth - 3, depth - 1]
        if depth < 7:  # the taps would repeat or go out of order, and a scale would silently vanish
            raise ValueError(f'LocalMIM reads blocks {self.ID} for its four scales: depth {depth} is too shallow '
                             f'(at least 7 blocks)')
        self.scale = [4.0, 2.0, 1.0, 0.5]
        self.norm = nn.ModuleList([norm_layer(embed_dim) for _ in range(len(self.ID))])
        self.initialize_weights()

        self.decoder = nn.ModuleList([
            MAE_Decoder(embed_dim, decoder_embed_dim, in_chans * hog_nbins, s, num_patches, decoder_depth,
                        decoder_num_heads, mlp_ratio, True, norm_layer) for s in self.scale])

        # HOG grid side per scale, and the pooling window in pixels (patch_size / scale)
        self.hog_sizes = [int(grid * s) for s in self.scale]
        self.hog_enc = nn.ModuleList([HOGLayer(nbins=hog_nbins, pool=patch_size / s, bias=hog_bias)
                                      for s in self.scale])

        # FreezeOut state: the first `num_frozen` layers are frozen; taps in `live_taps` are computed
        self.num_frozen = 0
        self.live_taps = list(range(len(self.ID)))

    def initialize_weights(self):
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.patch_embed.num_patches ** .5),
                                            cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # as a Linear layer on flattened patches
        nn.init.normal_(self.cls_token, std=.02)
        self.apply(_init_linear_and_norm)

    # ---- metadata -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Freezable layers: patch embedding (0) and one per block."""
        return len(self.blocks) + 1

    @property
    def tap_layers(self) -> list[int]:
        """FreezeOut layer index of the block each tap reads."""
        return [i + 1 for i in self.ID]

    def layer_modules(self, index: int) -> list[nn.Module | nn.Parameter]:
        if index == 0:
            return [self.patch_embed, self.cls_token]
        return [self.blocks[index - 1]]

    # ---- FreezeOut switches (set by util.freezeout.FreezeOut) --------------------------------
    def set_frozen(self, num_frozen: int, live_taps: list[int]) -> None:
        """Freeze layers [0, num_frozen): no autograd, requires_grad False, grads dropped.
        Taps not in live_taps are not computed at all (and their parameters are frozen)."""
        self.num_frozen = num_frozen
        self.live_taps = sorted(live_taps)
        for i in range(self.num_layers):
            frozen = i < num_frozen
            if i > 0:
                self.blocks[i - 1].active = not frozen
            for m in self.layer_modules(i):
                params = [m] if isinstance(m, nn.Parameter) else m.parameters()
                for p in params:
                    p.requires_grad_(not frozen)
                    if frozen:
                        p.grad = None
        for j in range(len(self.ID)):
            for m in (self.norm[j], self.decoder[j]):
                for name, p in m.named_parameters():
                    if name == 'pos_embed':
                        continue  # fixed sin-cos table, never trained
                    p.requires_grad_(j in self.live_taps)
                    if j not in self.live_taps:
                        p.grad = None

    # ---- upstream API ------------------------------------------------------------------------
    def HOG(self, imgs, k):
        """Upstream's per-scale target: (B, 3, H, W) -> (B, h*w, 3*nbins)."""
        return multi_scale_hog(imgs, self.hog_enc, self.hog_sizes, [k])[k]

    def random_masking(self, x, mask_ratio):
        """Per-sample random masking by argsort of uniform noise.
        x (N, L, D) -> kept tokens (N, L_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L)."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_keep = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_keep, mask, ids_restore

    def forward_encoder(self, x, mask_ratio):
        """Returns the normalised features of each tap (None for a dropped tap), mask, ids_restore."""
        grad_enabled = torch.is_grad_enabled()
        # the embedding is layer 0: no autograd once frozen
        with torch.set_grad_enabled(grad_enabled and self.num_frozen == 0):
            x = self.patch_embed(x)  # (B, L, D)
            x = x + self.pos_embed[:, 1:]
            x, mask, ids_restore = self.random_masking(x, mask_ratio)
            cls_tokens = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat((cls_tokens, x), dim=1)  # (B, 1 + L_keep, D)

        latent = [None] * len(self.ID)
        last_needed = max(self.ID[j] for j in self.live_taps)
        for i in range(last_needed + 1):
            x = self.blocks[i](x)
            if i in self.ID:
                j = self.ID.index(i)
                if j in self.live_taps:
                    latent[j] = self.norm[j](x)
        return latent, mask, ids_restore

    def recal_mask(self, mask, k):
        """Token mask (B, L) -> mask on scale k's HOG grid (B, (side*scale)**2)."""
        B, L, s = mask.size(0), mask.size(1), self.scale[k]
        H = W = int(L ** .5)
        if s >= 1.:
            s = int(s)
            mask = mask.reshape(B, H, W).unsqueeze(3).unsqueeze(2).repeat(1, 1, s, 1, s).reshape(B, -1)
        else:
            s = int(1 / s)
            mask = mask.reshape(B, H // s, s, W // s, s).transpose(2, 3).mean((-2, -1)).reshape(B, -1)
        return mask

    def forward_loss_terms(self, imgs, pred, mask) -> dict[int, torch.Tensor]:
        """Per-scale masked MSE, {k: scalar} for each scale with a prediction, in float32."""
        scales = [k for k in range(len(pred)) if pred[k] is not None]
        target = multi_scale_hog(imgs, self.hog_enc, self.hog_sizes, scales)
        terms = {}
        for k in scales:
            M = self.recal_mask(mask, k)
            per_token = ((pred[k].float() - target[k]) ** 2).mean(dim=-1)
            terms[k] = (per_token * M).sum() / M.sum()
        return terms

    def forward_loss(self, imgs, pred, mask):
        """imgs (N, 3, H, W), pred: list per scale (None = dropped), mask (N, L) with 1 = removed."""
        return sum(self.forward_loss_terms(imgs, pred, mask).values())

    def forward(self, imgs, mask_ratio=0.75, return_terms=False):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = [self.decoder[j](z, ids_restore) if z is not None else None for j, z in enumerate(latent)]
        terms = self.forward_loss_terms(imgs, pred, mask)
        loss = sum(terms.values())
        return (loss, terms) if return_terms else loss


def _mim(patch_size, embed_dim, depth, num_heads, **kwargs):
    kwargs.setdefault('img_size', 224)
    return MaskedAutoencoderViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8, mlp_ratio=4,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def MIM_vit_tiny_patch16(**kwargs):
    return _mim(16, 192, 12, 3, **kwargs)


def MIM_vit_small_patch16(**kwargs):
    return _mim(16, 384, 12, 6, **kwargs)


def MIM_vit_base_patch16(**kwargs):
    return _mim(16, 768, 12, 12, **kwargs)


def MIM_vit_large_patch16(**kwargs):
    return _mim(16, 1024, 24, 16, **kwargs)


def MIM_vit_huge_patch14(**kwargs):
    return _mim(14, 1280, 32, 16, **kwargs)


MODELS = {name: globals()[name] for name in MIM_MODELS}  # the names --model offers (util.flags)


def check_model(name: str, img_size: int = 224) -> None:
    """A clear SystemExit for an unknown --model or an --input_size it cannot take, before any work."""
    if name not in MODELS:
        raise SystemExit(f'error: unknown --model {name}; choose one of: {", ".join(sorted(MODELS))}')
    try:
        token_grid(img_size, 14 if name.endswith('patch14') else 16)
    except ValueError as e:
        raise SystemExit(f'error: --model {name}: {e}') from None


def build_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Constructor by name, checked by check_model."""
    check_model(name, kwargs.get('img_size', 224))
    return MODELS[name](**kwargs)
