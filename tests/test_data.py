"""util.data: folder layouts, the seeded crop/flip pipeline and the loader."""

import re

import numpy as np
import pytest
import torch
import torchvision.datasets as datasets
import torchvision.transforms.functional as TF
from PIL import Image

from util.data import (IMAGENET_MEAN, IMAGENET_STD, ClassFolder, PretrainTransform, SeededImageFolder,
                       build_classification_datasets, build_pretrain_loader, normalize_uint8_range,
                       resolve_image_folder)


def write_images(folder, n, size=(40, 30), seed=0):
    """n random RGB JPEGs of size (width, height) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f'img_{i}.jpg', quality=95)


def make_classes(base, n_per_class=2, classes=('cat', 'dog'), seed=0):
    for i, c in enumerate(classes):
        write_images(base / c, n_per_class, seed=seed + i)


# ---- layouts ---------------------------------------------------------------------------------
def test_layout_class_folders_directly(tmp_path):
    base = tmp_path / 'ds' / 'train' / 'image_folders'  # what the research notes point at
    make_classes(base)
    got = resolve_image_folder(str(base))
    assert got == base
    assert datasets.ImageFolder(str(got)).classes == ['cat', 'dog']


def test_layout_root_train_class(tmp_path):
    make_classes(tmp_path / 'train')
    got = resolve_image_folder(str(tmp_path))
    assert got == tmp_path / 'train'
    assert datasets.ImageFolder(str(got)).classes == ['cat', 'dog']


def test_layout_root_train_image_folders_finds_all_images(tmp_path):
    make_classes(tmp_path / 'train' / 'image_folders', n_per_class=3)
    got = resolve_image_folder(str(tmp_path))
    assert got in (tmp_path / 'train', tmp_path / 'train' / 'image_folders')
    assert len(datasets.ImageFolder(str(got))) == 6


def test_layout_root_train_image_folders_class(tmp_path):
    make_classes(tmp_path / 'train' / 'image_folders')
    got = resolve_image_folder(str(tmp_path))
    # the folder whose sub-folders are the classes, not <root>/train (one class 'image_folders')
    assert got == tmp_path / 'train' / 'image_folders'
    assert datasets.ImageFolder(str(got)).classes == ['cat', 'dog']


@pytest.mark.parametrize('layout, named', [
    (('training/cat', 'training/dog', 'validation/cat'), 'training/, validation/'),  # splits under other names
    (('train', 'val'), 'train/, val/'),  # split folders of images without class folders
    (('set_a/train/cat', 'set_a/val/cat', 'set_b/train/dog'), 'set_a/, set_b/'),  # a folder of data sets
])
def test_a_dataset_root_is_not_read_as_class_folders(tmp_path, layout, named):
    """Without <data_path>/train/<class>, the data path's own sub-folders are the classes; when
    those are data splits (or hold them), pretraining would pool the splits, val included, into
    a few classes: refused, naming the folders."""
    for folder in layout:
        write_images(tmp_path / folder, 2)
    with pytest.raises(SystemExit) as e:
        resolve_image_folder(str(tmp_path))
    assert named in str(e.value) and 'Point --data_path at the folder that holds the class folders' in str(e.value)


@pytest.mark.parametrize('layout', [
    ('apple', 'train', 'tractor'),  # CIFAR-100, VOC, COCO have a class "train"
    ('train',),  # one folder of images: upstream pretrains on it as one class
    ('n01440764', 'n01443537'),  # the research notes' class folders
])
def test_class_folders_that_are_not_splits_are_accepted(tmp_path, layout):
    for folder in layout:
        write_images(tmp_path / folder, 2)
    root = resolve_image_folder(str(tmp_path))
    assert root == tmp_path and ClassFolder(root).classes == sorted(layout)


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """A notebook's .ipynb_checkpoints/ (as a class, or inside one) and macOS ._x resource forks
    are skipped; an empty hidden folder does not stop the run as an empty class would."""
    make_classes(tmp_path / 'train')
    write_images(tmp_path / 'train' / '.ipynb_checkpoints', 1)
    write_images(tmp_path / 'train' / 'cat' / '.ipynb_checkpoints', 1)
    (tmp_path / 'train' / 'dog' / '._img_0.jpg').write_bytes(b'\x00\x05\x16\x07 not a JPEG')
    (tmp_path / 'train' / '.empty').mkdir()
    root = resolve_image_folder(str(tmp_path))
    folder = ClassFolder(root)
    assert folder.classes == ['cat', 'dog']
    assert sorted(p.split('/train/')[1] for p, _ in folder.samples) == [
        'cat/img_0.jpg', 'cat/img_1.jpg', 'dog/img_0.jpg', 'dog/img_1.jpg']
    write_images(tmp_path / 'val' / 'cat', 1)
    write_images(tmp_path / 'val' / '.ipynb_checkpoints', 1)  # not a class that train lacks
    train, val = build_classification_datasets(str(tmp_path), None, None)
    assert val.classes == ['cat', 'dog'] and len(val) == 1



def test_a_macos_archive_folder_is_skipped_and_a_class_of_hidden_files_named(tmp_path):
    """Unzipping an archive made on a Mac leaves __MACOSX/ (of ._x files) beside the classes: not
    a class. A class folder holding only hidden files is named in the error, which says why."""
    make_classes(tmp_path / 'train')
    (tmp_path / 'train' / '__MACOSX' / 'cat').mkdir(parents=True)
    (tmp_path / 'train' / '__MACOSX' / 'cat' / '._img_0.jpg').write_bytes(b'\x00\x05\x16\x07')
    root = resolve_image_folder(str(tmp_path))
    assert ClassFolder(root).classes == ['cat', 'dog']
    (tmp_path / 'train' / 'eel').mkdir()
    (tmp_path / 'train' / 'eel' / '._img_0.jpg').write_bytes(b'\x00\x05\x16\x07')
    with pytest.raises(SystemExit, match=r'no images in the class folder eel \(images: .jpg.*'
                                         r'hidden files such as ._x.JPEG are not images\)'):
        ClassFolder(root)


def test_val_without_some_training_classes_says_so(tmp_path, capsys):
    make_classes(tmp_path / 'train', classes=('cat', 'dog', 'eel'))
    make_classes(tmp_path / 'val', classes=('dog',))
    train, val = build_classification_datasets(str(tmp_path), None, None)
    assert len(val) == 2 and val.classes == ['cat', 'dog', 'eel']
    assert 'has no images of 2 of the 3 training classes (cat, eel)' in capsys.readouterr().out


def test_missing_path_message(tmp_path):
    with pytest.raises(SystemExit, match='does not exist') as e:
        resolve_image_folder(str(tmp_path / 'nope'))
    assert 'nope' in str(e.value)


def test_a_class_folder_or_an_image_given_as_data_path_is_named_as_such(tmp_path):
    make_classes(tmp_path / 'train', classes=('cat', 'dog'))
    one_class = tmp_path / 'train' / 'cat'
    with pytest.raises(SystemExit, match=r'holds images, not class folders of images: it looks like one class'):
        resolve_image_folder(str(one_class))
    image = next(one_class.iterdir())
    with pytest.raises(SystemExit, match=rf'^error: --data_path {re.escape(str(image))} is a file; give the folder'):
        resolve_image_folder(str(image))


def test_an_evaluation_split_given_as_training_data_gets_a_note(tmp_path, capsys):
    make_classes(tmp_path / 'train', classes=('cat', 'dog'))
    make_classes(tmp_path / 'val', classes=('cat', 'dog'))
    assert resolve_image_folder(str(tmp_path / 'val')) == tmp_path / 'val'
    assert 'is named like an evaluation split, and is read as the training images' in capsys.readouterr().out
    resolve_image_folder(str(tmp_path / 'train'))
    resolve_image_folder(str(tmp_path))
    assert capsys.readouterr().out == ''


def test_empty_folder_message(tmp_path):
    (tmp_path / 'train' / 'cat').mkdir(parents=True)  # a class folder without images
    with pytest.raises(SystemExit) as e:
        resolve_image_folder(str(tmp_path))
    msg = str(e.value)
    assert 'no class folders with images' in msg
    assert '<class>' in msg and 'train' in msg  # says what layout was expected


def test_an_empty_class_folder_is_a_clear_error_for_every_backend(tmp_path):
    """One class folder without images next to good ones: a DataLayoutError naming it (the
    dataset classes of all three backends share the check), not torchvision's traceback."""
    from util.gpu_data import GpuCacheLoader, JpegBytesFolder
    write_images(tmp_path / 'cat', 2)
    (tmp_path / 'zzz_empty').mkdir()
    (tmp_path / 'zzz_empty' / 'notes.txt').write_text('not an image')
    for make in (lambda: SeededImageFolder(tmp_path, PretrainTransform(32), 0), lambda: JpegBytesFolder(tmp_path),
                 lambda: GpuCacheLoader(tmp_path, 32, 1, 0, 0, 1, 0, 'cpu')):
        with pytest.raises(SystemExit, match=r'zzz_empty') as e:
            make()
        assert str(e.value).startswith('error: ') and str(tmp_path) in str(e.value)


H, W = 375, 500  # a typical ImageNet photo


# ---- transform -------------------------------------------------------------------------------
def test_transform_crops_to_uint8():
    t = PretrainTransform(32)
    for value in (0, 128, 255):
        x = t(Image.new('RGB', (W, H), (value,) * 3), torch.Generator().manual_seed(value))
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
        assert (x == value).all()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))
    y = t(img, torch.Generator().manual_seed(1))
    assert y.dtype == torch.uint8 and y.float().std() > 2  # real content, not a flat fill


def test_loader_normalises_like_upstream_to_tensor(tmp_path):
    """The loader's float batches equal upstream's ToTensor + Normalize of the same crops."""
    write_images(tmp_path / 'train' / 'a', 4, size=(50, 40), seed=3)
    loader = build_pretrain_loader(str(tmp_path), 32, 4, 0, 0, False, 1, 0, device='cpu')
    loader.sampler.set_epoch(0)
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    uint8 = torch.stack([loader.dataset[key][0] for key in list(loader.sampler)[:4]])
    ref = TF.normalize(uint8.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(images, ref, rtol=0, atol=1e-5)
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert images.min() >= lo - 1e-5 and images.max() <= hi + 1e-5


def test_normalize_uint8_range_values():
    for value in (0, 128, 255, 300):  # 300: bicubic overshoot is clipped as PIL does
        out = normalize_uint8_range(torch.full((1, 3, 2, 2), float(value)))
        for c in range(3):
            expected = (min(value, 255) / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            torch.testing.assert_close(out[0, c], torch.full((2, 2), expected), rtol=0, atol=1e-5)


def test_flip_rate_about_half():
    # a left-to-right ramp: any crop still increases to the right unless flipped
    ramp = np.tile(np.linspace(0, 255, W).astype(np.uint8)[None, :, None], (H, 1, 3))
    img = Image.fromarray(ramp)
    t = PretrainTransform(32)
    n, flipped = 300, 0
    for i in range(n):
        x = t(img, torch.Generator().manual_seed(i))
        left, right = x[0, :, 0].float().mean().item(), x[0, :, -1].float().mean().item()
        assert left != right
        flipped += left > right
    assert 0.4 * n <= flipped <= 0.6 * n


def test_seeded_dataset_determinism(tmp_path):
    write_images(tmp_path / 'train' / 'a', 3, size=(80, 60))
    ds = SeededImageFolder(tmp_path / 'train', PretrainTransform(32), seed=0)
    x1, y1 = ds[(0, 1)]
    x2, y2 = ds[(0, 1)]
    assert torch.equal(x1, x2) and y1 == y2
    assert torch.equal(ds[1][0], x1)  # a plain index means epoch 0
    x_epoch1, _ = ds[(1, 1)]
    assert not torch.equal(x_epoch1, x1)
    other_seed = SeededImageFolder(tmp_path / 'train', PretrainTransform(32), seed=1)
    assert not torch.equal(other_seed[(0, 1)][0], x1)


# ---- loader ----------------------------------------------------------------------------------
def _first_batch(root, seed, num_workers, epoch=0):
    loader = build_pretrain_loader(str(root), 32, 4, seed, num_workers, False, 1, 0)
    loader.sampler.set_epoch(epoch)
    it = iter(loader)
    x, y = next(it)
    del it, loader
    return x, y


def test_loader_same_first_batch_for_any_worker_count(tmp_path):
    write_images(tmp_path / 'train' / 'a', 5, size=(50, 40), seed=1)
    write_images(tmp_path / 'train' / 'b', 5, size=(40, 50), seed=2)
    x0, y0 = _first_batch(tmp_path, 0, 0)
    x2, y2 = _first_batch(tmp_path, 0, 2)
    assert x0.shape == (4, 3, 32, 32)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x_e1, _ = _first_batch(tmp_path, 0, 0, epoch=1)
    assert not torch.equal(x_e1, x0)
    x_s1, _ = _first_batch(tmp_path, 1, 0)
    assert not torch.equal(x_s1, x0)


def test_loader_too_few_images(tmp_path):
    write_images(tmp_path / 'train' / 'a', 3)
    with pytest.raises(SystemExit, match='fewer than one batch') as e:
        build_pretrain_loader(str(tmp_path), 32, 4, 0, 0, False, 1, 0)
    assert '3 images' in str(e.value) and 'batch_size' in str(e.value)


# ---- the linear probe's crop (MAE's) ------------------------------------------------------------

def test_linprobe_crop_clamps_a_box_that_does_not_fit_instead_of_falling_back():
    """Area 1 at aspect 2 on a square: 141 x 71, clamped to 100 x 71 (torchvision's crop
    gives up after ten tries and returns a 100 x 50 centre crop)."""
    import torchvision.transforms as T
    from util.data import ClampedResizedCrop
    img = Image.new('RGB', (100, 100))
    tops = set()
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, h, w = ClampedResizedCrop.get_params(img, [1.0, 1.0], [2.0, 2.0])
        assert (h, w, left) == (71, 100, 0)
        assert 0 <= top <= 29
        tops.add(top)
    assert len(tops) > 1  # the clamped box is placed at random
    assert T.RandomResizedCrop.get_params(img, [1.0, 1.0], [2.0, 2.0])[2:] == (50, 100)


def test_linprobe_crop_keeps_more_of_the_image_than_torchvisions():
    """MAE's single clamped draw vs torchvision's retry loop, scale (0.08, 1), on a 500 x 375
    photo: mean area fraction about 0.52 vs 0.44; every box inside the image."""
    import torchvision.transforms as T
    from util.data import ClampedResizedCrop, linprobe_train_transform
    img = Image.new('RGB', (500, 375))
    scale, ratio = [0.08, 1.0], [3 / 4, 4 / 3]

    def mean_area(get_params) -> float:
        torch.manual_seed(0)
        total = 0.0
        for _ in range(3000):
            top, left, h, w = get_params(img, scale, ratio)
            assert 0 <= top <= 375 - h and 0 <= left <= 500 - w and h > 0 and w > 0
            total += h * w / (500 * 375)
        return total / 3000

    assert 0.50 < mean_area(ClampedResizedCrop.get_params) < 0.54
    assert 0.41 < mean_area(T.RandomResizedCrop.get_params) < 0.46
    crop = linprobe_train_transform(32).transforms[0]
    assert isinstance(crop, ClampedResizedCrop) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC


def test_more_workers_than_cpus_is_one_note_not_torchs_warning_twice(monkeypatch, capsys):
    """torch warns when a loader is built and again when it is iterated; one note says it once."""
    import warnings

    from util import data
    monkeypatch.setattr(data, 'USABLE_CPUS', 1)
    monkeypatch.setattr(data, '_noted_worker_counts', set())
    dataset = torch.utils.data.TensorDataset(torch.arange(4.0))
    with warnings.catch_warnings(record=True) as caught:  # its filters are put back on leaving
        warnings.simplefilter('always')
        for _ in range(2):  # e.g. the train and the val loader
            assert [len(b[0]) for b in data.build_eval_loader(dataset, 2, 2, False)] == [2, 2]
    assert not [w for w in caught if 'worker' in str(w.message)]
    assert capsys.readouterr().out.count('note: 2 loader workers for the 1 CPUs this process may use') == 1
