"""util.hog: the shared-histogram multi-scale HOG equals upstream's per-scale computation."""
import pytest
import torch

import models_mim
from util.hog import HOGLayer, multi_scale_hog

NBINS = 9
ALL = [0, 1, 2, 3]


def per_scale(model, imgs, k):
    """Upstream's HOG(): each channel through hog_enc[k] separately, concatenated R, G, B."""
    chans = [model.hog_enc[k](imgs[:, c:c + 1]) for c in range(imgs.shape[1])]
    return torch.cat(chans, dim=1).flatten(2, 3).transpose(1, 2)


def make(img_size=64, hog_bias=False, seed=0):
    torch.manual_seed(seed)
    return models_mim.MIM_vit_tiny_patch16(img_size=img_size, hog_bias=hog_bias)


def images(seed=1, size=64, b=2):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_multi_scale_equals_per_scale_layers():
    model = make()
    imgs = images()
    out = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, ALL)
    assert sorted(out) == ALL
    for k, side in enumerate([16, 8, 4, 2]):
        ref = per_scale(model, imgs, k)
        assert out[k].shape == ref.shape == (2, side * side, 3 * NBINS)
        torch.testing.assert_close(out[k], ref, rtol=0, atol=1e-6)
        # and through the model's upstream-named entry point
        torch.testing.assert_close(model.HOG(imgs, k), ref, rtol=0, atol=1e-6)


def test_subset_of_scales():
    model = make()
    imgs = images()
    out = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, [3, 1])
    assert sorted(out) == [1, 3]
    for k in (1, 3):
        torch.testing.assert_close(out[k], per_scale(model, imgs, k), rtol=0, atol=1e-6)
    assert multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, []) == {}


def test_token_layout_channel_major():
    model = make()
    imgs = images(seed=2)
    out = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, [1])[1]  # 8x8 grid
    for c in range(3):
        hog_c = model.hog_enc[1](imgs[:, c:c + 1])  # (B, nbins, 8, 8)
        assert hog_c.shape == (2, NBINS, 8, 8)
        for b in range(2):
            for r in (0, 3, 7):
                for col in (0, 5, 7):
                    torch.testing.assert_close(out[b, r * 8 + col, c * NBINS:(c + 1) * NBINS],
                                               hog_c[b, :, r, col], rtol=0, atol=1e-6)
    # each channel's block is L2-normalised over its bins
    norms = out.reshape(2, 64, 3, NBINS).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_float32_for_bf16_input_and_under_autocast():
    model = make()
    imgs = images(seed=3)
    bf = imgs.bfloat16()
    expected = multi_scale_hog(bf.float(), model.hog_enc, model.hog_sizes, ALL)
    out = multi_scale_hog(bf, model.hog_enc, model.hog_sizes, ALL)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_ac = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, ALL)
    expected_ac = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, ALL)
    for k in ALL:
        assert out[k].dtype == torch.float32 and out_ac[k].dtype == torch.float32
        torch.testing.assert_close(out[k], expected[k], rtol=0, atol=1e-6)
        # autocast must not lower the precision of the Sobel conv
        torch.testing.assert_close(out_ac[k], expected_ac[k], rtol=0, atol=1e-6)


def test_hog_layer_forward_under_autocast():
    """Upstream's per-scale call must also work (in float32) inside an autocast region."""
    layer = HOGLayer(NBINS, 8.)
    x = images(seed=4)[:, :1]
    expected = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_hog_bias_per_scale():
    model = make(hog_bias=True)
    g = torch.Generator().manual_seed(9)
    for layer in model.hog_enc:  # make sure the scales' biases clearly differ
        layer.conv.bias.data = torch.randn(2, generator=g)
    imgs = images(seed=5)
    out = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, ALL)
    unbiased = multi_scale_hog(imgs, make().hog_enc, model.hog_sizes, ALL)
    for k in ALL:
        torch.testing.assert_close(out[k], per_scale(model, imgs, k), rtol=0, atol=1e-6)
        assert not torch.allclose(out[k], unbiased[k], atol=1e-3)
    # the bias of scale 0 must not leak into another scale
    swapped = [model.hog_enc[0]] * 4
    leaked = multi_scale_hog(imgs, swapped, model.hog_sizes, ALL)
    assert not torch.allclose(leaked[3], out[3], atol=1e-3)


def test_hog_layer_has_sobel_and_no_grad():
    layer = HOGLayer(NBINS, 4.)
    sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
    assert torch.equal(layer.conv.weight, torch.stack([sobel, sobel.t()])[:, None])
    assert layer.conv.padding_mode == 'reflect'
    assert all(not p.requires_grad for p in layer.parameters())
    x = images(seed=6, size=32)[:, :1].requires_grad_(True)
    assert not layer(x).requires_grad


@pytest.mark.parametrize('size', [32, 96])
def test_other_sizes(size):
    model = make(img_size=size)
    imgs = images(seed=7, size=size, b=1)
    grid = size // 16
    out = multi_scale_hog(imgs, model.hog_enc, model.hog_sizes, ALL)
    for k, s in enumerate([4, 2, 1, 0.5]):
        assert out[k].shape == (1, int(grid * s) ** 2, 3 * NBINS)
        torch.testing.assert_close(out[k], per_scale(model, imgs, k), rtol=0, atol=1e-6)
