"""LocalMIM model: shapes, the loss against an independent reference, parameter names,
constructors, input sizes and the FreezeOut switches."""
import math

import pytest
import torch
import torch.nn.functional as F

import models_mim
from helpers import grad_layout_mismatches

NBINS = 9
SCALES = [4.0, 2.0, 1.0, 0.5]
SOBEL_X = [[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]]
SOBEL_Y = [[SOBEL_X[j][i] for j in range(3)] for i in range(3)]  # transpose


# ---------------------------------------------------------------------------------------------
# independent reference implementation (float64, per image, per channel, per scale)
# ---------------------------------------------------------------------------------------------
def _reflect_index(n):
    # reflect padding by one pixel: -1 -> 1, n -> n - 2
    return [1] + list(range(n)) + [n - 2]


def ref_channel_hog(img, pool, nbins=NBINS, bias=(0.0, 0.0)):
    """img (H, W) float64 -> (nbins, H // pool, W // pool) L2-normalised histogram."""
    H, W = img.shape
    padded = img[_reflect_index(H)][:, _reflect_index(W)]  # (H + 2, W + 2)
    gx = torch.full((H, W), float(bias[0]), dtype=torch.float64)
    gy = torch.full((H, W), float(bias[1]), dtype=torch.float64)
    for di in range(3):
        for dj in range(3):
            window = padded[di:di + H, dj:dj + W]
            gx = gx + SOBEL_X[di][dj] * window
            gy = gy + SOBEL_Y[di][dj] * window
    magnitude = torch.sqrt(gx * gx + gy * gy)
    phase = torch.atan2(gx, gy)
    bins = torch.remainder(torch.floor(phase / math.pi * nbins).long(), nbins)
    hist = torch.zeros(nbins, H, W, dtype=torch.float64)
    for n in range(nbins):
        hist[n] = torch.where(bins == n, magnitude, torch.zeros_like(magnitude))
    pooled = hist.reshape(nbins, H // pool, pool, W // pool, pool).mean(dim=(2, 4))
    norm = torch.sqrt((pooled ** 2).sum(dim=0, keepdim=True)).clamp_min(1e-12)
    return pooled / norm


def ref_hog_tokens(imgs, patch, scale, nbins=NBINS, bias=(0.0, 0.0)):
    """imgs (B, 3, H, W) -> (B, h*w, 3*nbins): R, G, B histograms concatenated channel-major."""
    pool = int(round(patch / scale))
    out = []
    for b in range(imgs.shape[0]):
        chans = [ref_channel_hog(imgs[b, c].double(), pool, nbins, bias) for c in range(imgs.shape[1])]
        feat = torch.cat(chans, dim=0)  # (3*nbins, h, w)
        out.append(feat.reshape(feat.shape[0], -1).t())
    return torch.stack(out)


def ref_scale_mask(mask, grid, scale):
    """Token mask (B, grid*grid) -> mask on the HOG grid of `scale`, (B, side*side)."""
    B = mask.shape[0]
    side = int(grid * scale)
    m = mask.double().reshape(B, grid * grid)
    out = torch.zeros(B, side, side, dtype=torch.float64)
    for r in range(side):
        for c in range(side):
            if scale >= 1:
                s = int(scale)
                out[:, r, c] = m[:, (r // s) * grid + (c // s)]
            else:
                f = int(round(1 / scale))
                vals = [m[:, (r * f + a) * grid + (c * f + bb)] for a in range(f) for bb in range(f)]
                out[:, r, c] = sum(vals) / len(vals)
    return out.reshape(B, -1)


def ref_loss_terms(imgs, preds, mask, grid, patch):
    terms = {}
    for k, s in enumerate(SCALES):
        if preds[k] is None:
            continue
        target = ref_hog_tokens(imgs, patch, s)
        M = ref_scale_mask(mask, grid, s)
        per_token = ((preds[k].double() - target) ** 2).mean(dim=-1)
        terms[k] = (per_token * M).sum() / M.sum()
    return terms


def fixed_masking(perms, len_keep):
    """A replacement for model.random_masking with a mask chosen by the test."""
    N, L = perms.shape
    mask = torch.ones(N, L)
    for b in range(N):
        mask[b, perms[b, :len_keep]] = 0

    def random_masking(x, mask_ratio):
        assert x.shape[:2] == (N, L)
        ids_shuffle = perms.clone()
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_keep = torch.stack([x[b, perms[b, :len_keep]] for b in range(N)])
        return x_keep, mask.clone(), ids_restore

    return random_masking, mask


def make_model(img_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    m = models_mim.MIM_vit_tiny_patch16(img_size=img_size, **kw)
    m.eval()  # no dropout anyway; makes the intent explicit
    return m


def capture_preds(model):
    preds = {}
    handles = [dec.register_forward_hook(lambda mod, inp, out, j=j: preds.__setitem__(j, out))
               for j, dec in enumerate(model.decoder)]
    return preds, handles


# ---------------------------------------------------------------------------------------------
def test_encoder_and_decoder_shapes_and_finite_loss():
    model = make_model(64)
    B, grid, D = 2, 4, 192
    imgs = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    kept = int(grid * grid * 0.25)
    assert len(latent) == 4
    for z in latent:
        assert z.shape == (B, 1 + kept, D)
    assert mask.shape == (B, grid * grid) and ids_restore.shape == (B, grid * grid)
    for j, s in enumerate(SCALES):
        p = model.decoder[j](latent[j], ids_restore)
        assert p.shape == (B, int(grid * s) ** 2, 3 * NBINS)
    loss = model(imgs, mask_ratio=0.75)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0


def test_random_masking_semantics_match_upstream_rng_use():
    model = make_model(64)
    N, L, D = 3, 16, 5
    x = torch.arange(N * L * D, dtype=torch.float32).reshape(N, L, D)
    torch.manual_seed(7)
    noise = torch.rand(N, L)
    expected_keep = torch.argsort(noise, dim=1)[:, :4]  # the smallest noise is kept
    torch.manual_seed(7)
    x_keep, mask, ids_restore = model.random_masking(x, 0.75)
    assert x_keep.shape == (N, 4, D)
    assert torch.equal(mask.sum(1), torch.full((N,), 12.))
    for b in range(N):
        assert torch.equal(x_keep[b], x[b, expected_keep[b]])
        kept_pos = set(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert kept_pos == set(expected_keep[b].tolist())
        # ids_restore undoes the shuffle: kept tokens (first in shuffled order) return to place
        full = torch.cat([x_keep[b], torch.full((L - 4, D), -1.)])
        restored = full[ids_restore[b]]
        for p in range(L):
            if p in kept_pos:
                assert torch.equal(restored[p], x[b, p])
            else:
                assert torch.all(restored[p] == -1)


def test_hog_targets_match_reference():
    model = make_model(64)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for k, s in enumerate(SCALES):
        ours = model.HOG(imgs, k)
        ref = ref_hog_tokens(imgs, 16, s)
        assert ours.shape == ref.shape == (2, int(4 * s) ** 2, 3 * NBINS)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_recal_mask_matches_reference():
    model = make_model(64)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(3, 16, generator=g) > 0.5).float()
    for k, s in enumerate(SCALES):
        assert torch.equal(model.recal_mask(mask, k).double(), ref_scale_mask(mask, 4, s))


def test_loss_matches_independent_implementation():
    model = make_model(64)
    B, grid, L = 2, 4, 16
    len_keep = int(L * (1 - 0.75))
    g = torch.Generator().manual_seed(11)
    perms = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    model.random_masking, mask = fixed_masking(perms, len_keep)
    imgs = torch.randn(B, 3, 64, 64, generator=g)
    preds, handles = capture_preds(model)
    with torch.no_grad():
        loss, terms = model(imgs, mask_ratio=0.75, return_terms=True)
    for h in handles:
        h.remove()
    assert sorted(preds) == [0, 1, 2, 3]
    ref_terms = ref_loss_terms(imgs, [preds[j] for j in range(4)], mask, grid, 16)
    ref_loss = sum(ref_terms.values())
    assert sorted(terms) == [0, 1, 2, 3]
    for k in range(4):
        assert abs(terms[k].item() - ref_terms[k].item()) <= 1e-5 * abs(ref_terms[k].item())
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    # and the loss really depends on which tokens are masked
    model.random_masking, _ = fixed_masking(perms.flip(1), len_keep)
    with torch.no_grad():
        other = model(imgs, mask_ratio=0.75)
    assert abs(other.item() - loss.item()) > 1e-4


def test_loss_same_seed_same_mask():
    model = make_model(64)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.manual_seed(123)
        a = model(imgs)
        torch.manual_seed(123)
        b = model(imgs)
        torch.manual_seed(124)
        c = model(imgs)
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_decoder_puts_mask_tokens_at_masked_positions():
    model = make_model(64)
    B, L, len_keep = 2, 16, 4
    g = torch.Generator().manual_seed(2)
    perms = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    model.random_masking, mask = fixed_masking(perms, len_keep)
    imgs = torch.randn(B, 3, 64, 64, generator=g)
    with torch.no_grad():
        latent, _, ids_restore = model.forward_encoder(imgs, 0.75)
        for j in (0, 3):
            dec = model.decoder[j]
            seen = {}
            h = dec.blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__('x', args[0]))
            dec(latent[j], ids_restore)
            h.remove()
            x = seen['x']  # (B, 1 + L, d)
            emb = dec.embed(latent[j])  # (B, 1 + len_keep, d)
            pos = dec.pos_embed[0]
            torch.testing.assert_close(x[:, 0], emb[:, 0] + pos[0])
            for b in range(B):
                for i in range(len_keep):  # i-th kept token sits at position perms[b, i]
                    p = perms[b, i].item()
                    torch.testing.assert_close(x[b, 1 + p], emb[b, 1 + i] + pos[1 + p])
                for p in perms[b, len_keep:].tolist():
                    assert mask[b, p] == 1
                    torch.testing.assert_close(x[b, 1 + p], dec.mask_token[0, 0] + pos[1 + p])


# ---------------------------------------------------------------------------------------------
# independent functional reference of upstream LocalMIM's forward (float64; plain torch ops on
# the model's parameters, looked up by name; no module of the model is called)
# ---------------------------------------------------------------------------------------------
UPSTREAM_EPS = 1e-6  # upstream's norm_layer, partial(nn.LayerNorm, eps=1e-6), in the decoders too
TINY = dict(depth=12, heads=3, decoder_depth=1, decoder_heads=8)  # decoder: upstream's 256/1/8


def ref_sincos_table(dim, grid):
    """MAE's fixed table, (1 + grid*grid, dim): row 0 (cls) is zero; token p = r*grid + c gets
    [sin(c*w), cos(c*w), sin(r*w), cos(r*w)] with w_i = 10000 ** (-i / (dim / 4))."""
    quarter = dim // 4
    w = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    r = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)[:, None]  # (L, 1)
    c = torch.arange(grid, dtype=torch.float64).repeat(grid)[:, None]  # (L, 1)
    table = torch.cat([torch.sin(c * w), torch.cos(c * w), torch.sin(r * w), torch.cos(r * w)], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])  # (1 + L, dim)


def ref_block(x, p, pre, heads):
    """timm's pre-norm ViT block: x + proj(softmax(q k^T / sqrt(hd)) v) on LN1(x), then
    x + fc2(GELU(fc1(LN2(x)))) (exact GELU, LayerNorm eps 1e-6, qkv with bias)."""
    B, N, C = x.shape
    hd = C // heads
    h = F.layer_norm(x, (C,), p[pre + 'norm1.weight'], p[pre + 'norm1.bias'], UPSTREAM_EPS)
    qkv = F.linear(h, p[pre + 'attn.qkv.weight'], p[pre + 'attn.qkv.bias'])  # (B, N, 3C)
    q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
    attn = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1)  # (B, heads, N, N)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)  # heads concatenated per token
    x = x + F.linear(out, p[pre + 'attn.proj.weight'], p[pre + 'attn.proj.bias'])
    h = F.layer_norm(x, (C,), p[pre + 'norm2.weight'], p[pre + 'norm2.bias'], UPSTREAM_EPS)
    h = F.gelu(F.linear(h, p[pre + 'mlp.fc1.weight'], p[pre + 'mlp.fc1.bias']))  # (B, N, 4C)
    return x + F.linear(h, p[pre + 'mlp.fc2.weight'], p[pre + 'mlp.fc2.bias'])


def ref_decoder(latent, ids_keep, p, j, scale, num_tokens, depth, heads):
    """Upstream's MAE_Decoder j: embed, mask token at every removed position, decoder pos table,
    blocks, LayerNorm, drop cls, then the head of its scale. -> (B, (grid*scale)**2, out)."""
    pre = f'decoder.{j}.'
    B = latent.shape[0]
    y = F.linear(latent, p[pre + 'embed.weight'], p[pre + 'embed.bias'])  # (B, 1 + keep, d)
    d = y.shape[-1]
    tokens = p[pre + 'mask_token'].expand(B, num_tokens, d).clone()  # (B, L, d)
    for b in range(B):
        tokens[b, ids_keep[b]] = y[b, 1:]  # the i-th kept token goes back to position ids_keep[b, i]
    x = torch.cat([y[:, :1], tokens], dim=1) + p[pre + 'pos_embed']  # (B, 1 + L, d)
    for i in range(depth):
        x = ref_block(x, p, f'{pre}blocks.{i}.', heads)
    x = F.layer_norm(x, (d,), p[pre + 'norm.weight'], p[pre + 'norm.bias'], UPSTREAM_EPS)
    g = int(round(num_tokens ** 0.5))
    x = x[:, 1:].transpose(1, 2).reshape(B, d, g, g)  # cls dropped; (B, d, g, g), token r*g + c
    head = pre + 'pred.'
    if scale == 4.0:  # convT x2, channels-first LayerNorm, GELU, convT x2, 1x1 conv
        x = F.conv_transpose2d(x, p[head + '0.weight'], p[head + '0.bias'], stride=2)  # (B, d/2, 2g, 2g)
        mu = x.mean(1, keepdim=True)
        var = ((x - mu) ** 2).mean(1, keepdim=True)  # biased, over channels only
        x = (x - mu) / torch.sqrt(var + UPSTREAM_EPS)
        x = p[head + '1.weight'][:, None, None] * x + p[head + '1.bias'][:, None, None]
        x = F.gelu(x)
        x = F.conv_transpose2d(x, p[head + '3.weight'], p[head + '3.bias'], stride=2)  # (B, d/4, 4g, 4g)
        last = '4'
    elif scale == 2.0:  # convT x2, 1x1 conv
        x = F.conv_transpose2d(x, p[head + '0.weight'], p[head + '0.bias'], stride=2)  # (B, d/2, 2g, 2g)
        last = '1'
    elif scale == 1.0:  # 1x1 conv only
        last = '0'
    else:  # 0.5: 2x2 average pooling, 1x1 conv
        x = F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, d, g/2, g/2)
        last = '1'
    x = F.conv2d(x, p[head + last + '.weight'], p[head + last + '.bias'])  # (B, out, g*s, g*s)
    return x.flatten(2).transpose(1, 2)  # (B, (g*s)**2, out), row-major over the grid


def ref_localmim_forward(model, imgs, mask_ratio, seed, patch, depth, heads, decoder_depth,
                         decoder_heads, nbins, hog_bias):
    """Upstream's MaskedAutoencoderViT.forward; returns (preds, {k: term}, ids_keep)."""
    p = dict(model.named_parameters())
    B = imgs.shape[0]
    proj_w, proj_b = p['patch_embed.proj.weight'], p['patch_embed.proj.bias']
    x = F.conv2d(imgs, proj_w, proj_b, stride=patch)  # (B, D, g, g): one patch per output position
    D, g = x.shape[1], x.shape[2]
    L = g * g
    x = x.flatten(2).transpose(1, 2) + p['pos_embed'][:, 1:]  # (B, L, D), token r*g + c
    # masking: one torch.rand(B, L) draw; the len_keep smallest noise values are kept
    torch.manual_seed(seed)
    noise = torch.rand(B, L)
    ids_keep = torch.argsort(noise, dim=1)[:, :int(L * (1 - mask_ratio))]  # (B, keep)
    mask = torch.ones(B, L, dtype=torch.float64).scatter_(1, ids_keep, 0.)  # 1 = removed
    x = torch.stack([x[b, ids_keep[b]] for b in range(B)])  # (B, keep, D)
    cls = (p['cls_token'] + p['pos_embed'][:, :1]).expand(B, -1, -1)  # (B, 1, D)
    x = torch.cat([cls, x], dim=1)  # (B, 1 + keep, D)
    taps = [1, 3, depth - 3, depth - 1]  # tap j reads block taps[j]'s output through norm.j
    latent = []
    for i in range(depth):
        x = ref_block(x, p, f'blocks.{i}.', heads)
        if i in taps:
            j = taps.index(i)
            latent.append(F.layer_norm(x, (D,), p[f'norm.{j}.weight'], p[f'norm.{j}.bias'], UPSTREAM_EPS))
    preds = [ref_decoder(latent[j], ids_keep, p, j, s, L, decoder_depth, decoder_heads)
             for j, s in enumerate(SCALES)]
    terms = {}
    for k, s in enumerate(SCALES):
        bias = tuple(p[f'hog_enc.{k}.conv.bias'].tolist()) if hog_bias else (0.0, 0.0)
        target = ref_hog_tokens(imgs, patch, s, nbins, bias)  # pools of 4, 8, 16, 32 px
        M = ref_scale_mask(mask, g, s)
        terms[k] = (((preds[k] - target) ** 2).mean(dim=-1) * M).sum() / M.sum()
    return preds, terms, ids_keep


@pytest.mark.parametrize('kw', [{}, {'hog_nbins': 18, 'hog_bias': True}], ids=['default', 'nbins18_bias'])
def test_forward_matches_functional_upstream_reference(kw):
    """The whole forward against `ref_localmim_forward`, with the same weights and the same
    seeded mask. The reference encodes upstream's forward: conv patch embedding + fixed sin-cos
    table; masking keeps the tokens with the smallest torch.rand(B, L) noise (the forward's only
    random draw); cls token + table row 0; taps after blocks [1, 3, depth-3, depth-1], tap j
    through norm.j (eps 1e-6) into decoder j at scale [4, 2, 1, 0.5][j]; each decoder embeds,
    scatters mask tokens, adds its own table, runs one block (8 heads), LayerNorm eps 1e-6,
    drops cls and applies its scale's head; the loss sums the masked MSE to per-channel HOG
    pooled over 16/scale px. Every 1-d parameter is perturbed first: at init all LayerNorms are
    identical and a swapped tap norm would go unseen. The loss is float32 by design (float32
    HOG targets), so decoder outputs are compared in float64 at 1e-9, the terms at 1e-5."""
    nbins, hog_bias, seed = kw.get('hog_nbins', NBINS), kw.get('hog_bias', False), 21
    model = make_model(64, seed=0, **kw)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad and prm.ndim == 1:  # norm weights and biases, layer biases
                prm.add_(0.1 * torch.randn(prm.shape, generator=g))
    model.double()
    model.hog_enc.float()  # HOG runs in float32 (input cast to float); its conv must stay float32
    # float32 values, so the model's float32 HOG sees the same pixels; with seed 11 no pixel's
    # orientation lies within 2e-5 bins of a bin edge (in both configs), so float32 rounding
    # cannot move a pixel to another bin than the float64 reference puts it in
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11)).double()
    for name in ['pos_embed'] + [f'decoder.{j}.pos_embed' for j in range(4)]:
        table = model.get_parameter(name)[0]
        torch.testing.assert_close(table, ref_sincos_table(table.shape[-1], 4), rtol=0, atol=1e-6)

    preds, handles = capture_preds(model)
    seen = {}
    handles.append(model.decoder[0].register_forward_pre_hook(
        lambda mod, args: seen.__setitem__('ids_restore', args[1])))
    torch.manual_seed(seed)
    with torch.no_grad():
        loss, terms = model(imgs, mask_ratio=0.75, return_terms=True)
    rng_after_model = torch.get_rng_state()
    for h in handles:
        h.remove()
    with torch.no_grad():
        ref_preds, ref_terms, ids_keep = ref_localmim_forward(
            model, imgs, 0.75, seed, patch=16, nbins=nbins, hog_bias=hog_bias, **TINY)
    # same random draws, so the same mask: kept tokens come first in the model's shuffle order
    assert torch.equal(torch.get_rng_state(), rng_after_model)
    assert ids_keep.shape == (2, 4)
    assert torch.equal(torch.argsort(seen['ids_restore'], dim=1)[:, :4], ids_keep)

    assert sorted(preds) == sorted(terms) == [0, 1, 2, 3]
    for j, s in enumerate(SCALES):
        assert preds[j].dtype == torch.float64
        assert preds[j].shape == ref_preds[j].shape == (2, int(4 * s) ** 2, 3 * nbins)
        torch.testing.assert_close(preds[j], ref_preds[j], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(terms[j].double(), ref_terms[j], rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), sum(ref_terms.values()), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
def _expected_upstream_keys(depth=12, decoder_depth=1, hog_bias=False):
    """Keys upstream's MaskedAutoencoderViT has (timm Block, its LayerNorm, HOGLayer)."""
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
             'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
             'mlp.fc2.weight', 'mlp.fc2.bias']
    keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    keys |= {f'blocks.{i}.{k}' for i in range(depth) for k in block}
    keys |= {f'norm.{j}.{w}' for j in range(4) for w in ('weight', 'bias')}
    # prediction heads: scale 4 = [convT, LayerNorm2d, GELU, convT, conv], 2 = [convT, conv],
    # 1 = [conv], 0.5 = [avgpool, conv]
    pred_idx = {0: [0, 1, 3, 4], 1: [0, 1], 2: [0], 3: [1]}
    for j in range(4):
        keys |= {f'decoder.{j}.{k}' for k in ('embed.weight', 'embed.bias', 'mask_token', 'pos_embed',
                                               'norm.weight', 'norm.bias')}
        keys |= {f'decoder.{j}.blocks.{i}.{k}' for i in range(decoder_depth) for k in block}
        keys |= {f'decoder.{j}.pred.{i}.{w}' for i in pred_idx[j] for w in ('weight', 'bias')}
        keys.add(f'hog_enc.{j}.conv.weight')
        if hog_bias:
            keys.add(f'hog_enc.{j}.conv.bias')
    return keys


def test_state_dict_keys_match_upstream_base():
    torch.manual_seed(0)
    model = models_mim.MIM_vit_base_patch16()
    sd = model.state_dict()
    assert set(sd) == _expected_upstream_keys(depth=12)
    assert sd['patch_embed.proj.weight'].shape == (768, 3, 16, 16)
    assert sd['cls_token'].shape == (1, 1, 768)
    assert sd['pos_embed'].shape == (1, 197, 768)
    assert sd['blocks.0.attn.qkv.weight'].shape == (3 * 768, 768)
    assert sd['blocks.11.mlp.fc1.weight'].shape == (4 * 768, 768)
    assert sd['norm.0.weight'].shape == (768,)
    assert sd['decoder.0.embed.weight'].shape == (256, 768)
    assert sd['decoder.0.pos_embed'].shape == (1, 197, 256)
    assert sd['decoder.0.pred.0.weight'].shape == (256, 128, 2, 2)
    assert sd['decoder.0.pred.3.weight'].shape == (128, 64, 2, 2)
    assert sd['decoder.0.pred.4.weight'].shape == (27, 64, 1, 1)
    assert sd['decoder.1.pred.1.weight'].shape == (27, 128, 1, 1)
    assert sd['decoder.2.pred.0.weight'].shape == (27, 256, 1, 1)
    assert sd['decoder.3.pred.1.weight'].shape == (27, 256, 1, 1)
    sobel = torch.tensor(SOBEL_X)
    for j in range(4):
        assert torch.equal(sd[f'hog_enc.{j}.conv.weight'], torch.stack([sobel, sobel.t()])[:, None])
    # a fixed sin-cos table: cls row zero, first patch row = sin(0)..., cos(0)...
    assert torch.all(sd['pos_embed'][0, 0] == 0)
    assert not model.pos_embed.requires_grad
    assert all(not p.requires_grad for p in model.hog_enc.parameters())


def test_state_dict_keys_with_hog_bias():
    model = make_model(32, hog_bias=True)
    assert set(model.state_dict()) == _expected_upstream_keys(depth=12, hog_bias=True)


@pytest.mark.parametrize('name,patch,dim,depth,heads', [
    ('MIM_vit_tiny_patch16', 16, 192, 12, 3),
    ('MIM_vit_small_patch16', 16, 384, 12, 6),
    ('MIM_vit_base_patch16', 16, 768, 12, 12),
    ('MIM_vit_large_patch16', 16, 1024, 24, 16),
    ('MIM_vit_huge_patch14', 14, 1280, 32, 16),
])
def test_constructors(name, patch, dim, depth, heads):
    with torch.device('meta'):
        model = getattr(models_mim, name)()
    assert model.patch_embed.proj.weight.shape == (dim, 3, patch, patch)
    assert len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.ID == [1, 3, depth - 3, depth - 1]
    assert model.pos_embed.shape == (1, 1 + (224 // patch) ** 2, dim)
    assert len(model.decoder) == 4 and len(model.hog_enc) == 4
    assert model.decoder[0].embed.out_features == 256
    assert model.decoder[0].blocks[0].attn.num_heads == 8
    assert len(model.decoder[0].blocks) == 1
    assert model.norm[0].eps == 1e-6


def test_every_constructor_is_offered_and_has_a_flop_shape():
    """--model's names come from util.flags (read without torch): a constructor missing there could not
    be chosen, and the FLOP model (time-left estimates, estimate_speedup) knows the same names."""
    import models_vit
    from util import flops
    from util.flags import MIM_MODELS, VIT_MODELS
    assert sorted(name for name in vars(models_mim) if name.startswith('MIM_vit_')) == sorted(MIM_MODELS)
    assert sorted(name for name in vars(models_vit) if name.startswith('vit_')) == sorted(VIT_MODELS)
    assert list(models_mim.MODELS) == list(MIM_MODELS) and list(models_vit.MODELS) == list(VIT_MODELS)
    assert sorted(flops.SHAPES) == sorted(MIM_MODELS)


def test_odd_token_grid_raises_clear_error():
    with pytest.raises(ValueError, match=r'odd token grid.*3x3'):
        models_mim.MIM_vit_tiny_patch16(img_size=48)


@pytest.mark.parametrize('img_size', [32, 96])
def test_other_even_grids_work(img_size):
    model = make_model(img_size)
    grid = img_size // 16
    imgs = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    preds, handles = capture_preds(model)
    torch.manual_seed(0)
    loss = model(imgs, mask_ratio=0.75)
    for h in handles:
        h.remove()
    assert torch.isfinite(loss)
    for j, s in enumerate(SCALES):
        assert preds[j].shape == (1, int(grid * s) ** 2, 3 * NBINS)


# ---------------------------------------------------------------------------------------------
def test_set_frozen_freezes_prefix_and_drops_taps():
    model = make_model(32)
    model.train()
    k, live = 3, [2, 3]
    model.set_frozen(k, live)
    # layer 0 = patch_embed + cls_token, layer b+1 = blocks[b]
    for p in model.patch_embed.parameters():
        assert not p.requires_grad
    assert not model.cls_token.requires_grad
    for b, blk in enumerate(model.blocks):
        for p in blk.parameters():
            assert p.requires_grad == (b + 1 >= k), b
    for j in range(4):
        for name, p in list(model.norm[j].named_parameters()) + list(model.decoder[j].named_parameters()):
            if name == 'pos_embed':
                assert not p.requires_grad
            else:
                assert p.requires_grad == (j in live), (j, name)

    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # the frozen prefix runs with autograd off (not only with requires_grad False): layer by layer,
    # seen from inside each layer's forward (a hook on the layer itself runs after it returns)
    layers = [model.patch_embed.proj, *(blk.attn for blk in model.blocks)]
    grad_mode = {}
    def record(n):
        def hook(module, inputs, output):
            grad_mode[n] = torch.is_grad_enabled()
        return hook
    handles = [m.register_forward_hook(record(n)) for n, m in enumerate(layers)]
    torch.manual_seed(0)
    latent, _, _ = model.forward_encoder(imgs, 0.75)
    for h in handles:
        h.remove()
    assert grad_mode == {n: n >= k for n in range(len(layers))}
    assert latent[0] is None and latent[1] is None
    assert latent[2] is not None and latent[3] is not None

    preds, handles = capture_preds(model)
    torch.manual_seed(0)
    loss, terms = model(imgs, 0.75, return_terms=True)
    for h in handles:
        h.remove()
    assert sorted(preds) == live  # dropped taps' decoders never run
    assert len(terms) == len(live) and sorted(terms) == live
    assert abs(loss.item() - sum(t.item() for t in terms.values())) < 1e-6
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name

    # unfreezing everything restores training of all but the fixed tables and HOG convs
    model.set_frozen(0, [0, 1, 2, 3])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {'pos_embed'} | {f'decoder.{j}.pos_embed' for j in range(4)} | \
        {f'hog_enc.{j}.conv.weight' for j in range(4)}
    torch.manual_seed(0)
    loss, terms = model(imgs, 0.75, return_terms=True)
    assert sorted(terms) == [0, 1, 2, 3]


def test_set_frozen_only_early_taps_live():
    model = make_model(32)
    model.set_frozen(0, [0])
    imgs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    loss, terms = model(imgs, 0.75, return_terms=True)
    assert list(terms) == [0]
    loss.backward()
    # blocks after the last live tap (block 1) are not run, so they get no gradient
    assert model.blocks[1].attn.qkv.weight.grad is not None
    assert model.blocks[2].attn.qkv.weight.grad is None


def test_bf16_autocast_step_keeps_float32_targets_and_loss():
    """The GPU default (bf16 autocast): loss terms are float32 and the step trains."""
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch16(img_size=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 3, 32, 32)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, terms = model(x, mask_ratio=0.75, return_terms=True)
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('amp', [False, True])
def test_every_gradient_has_its_parameters_strides(amp, threads):
    """DDP all-reduces a gradient in place only when its strides are the parameter's: the decoders'
    1x1 head convs read a channels-last token grid, so their weights are made channels-last too.
    (The CPU's conv kernel, and so the gradient's layout, depends on the thread count.)"""
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch16(img_size=64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = model(torch.randn(2, 3, 64, 64), mask_ratio=0.75)
        loss.backward()
    finally:
        torch.set_num_threads(before)
    assert sum(p.grad is not None for p in model.parameters()) > 100
    assert grad_layout_mismatches(model) == []


def test_a_model_too_shallow_for_four_distinct_taps_is_refused():
    with pytest.raises(ValueError, match=r'blocks \[1, 3, 3, 5\].*depth 6 is too shallow'):
        models_mim.MaskedAutoencoderViT(img_size=32, patch_size=16, embed_dim=48, depth=6, num_heads=3,
                                        decoder_embed_dim=32, decoder_num_heads=4)
    assert models_mim.MaskedAutoencoderViT(img_size=32, patch_size=16, embed_dim=48, depth=7, num_heads=3,
                                           decoder_embed_dim=32, decoder_num_heads=4).ID == [1, 3, 4, 6]
