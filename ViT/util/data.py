"""Datasets, folder layouts and the pretraining input pipeline.

Augmentation randomness is a pure function of (seed, epoch, sample index): every sample's
crop and flip come from its own generator. That makes runs reproducible whatever the
number of workers, and an interrupted run resumes with exactly the same inputs.
"""
from __future__ import annotations

import io
import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data
import torchvision.datasets as datasets
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from util.cli import USABLE_CPUS
from util.dist import is_main_process

_noted_worker_counts: set[int] = set()


def check_num_workers(num_workers: int) -> int:
    """`num_workers`, with one note when it is more than the CPUs this process may use, in place of
    torch's warning, which each loader gives twice (when built and when first iterated)."""
    warnings.filterwarnings('ignore', message='This DataLoader will create', category=UserWarning)
    if num_workers > USABLE_CPUS and num_workers not in _noted_worker_counts:
        _noted_worker_counts.add(num_workers)
        print(f'note: {num_workers} loader workers for the {USABLE_CPUS} CPUs this process may use: they '
              f'will compete for them (lower --num_workers if the input slows down)')
    return num_workers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = tuple(datasets.folder.IMG_EXTENSIONS)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3. / 4., 4. / 3.)


class DataLayoutError(SystemExit):
    """Raised with a message for the user when a data folder is missing or malformed."""

    def __init__(self, message: str):
        super().__init__('error: ' + message)


class UnreadableImage(RuntimeError):
    """A file of the data set that cannot be decoded; the message names it. A RuntimeError, not a
    SystemExit, so that a DataLoader worker hands it to the main process (util.runtime.run_main
    turns it into a one-line error there)."""


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """torchvision's default ImageFolder loader (PIL, RGB), with an error that names the file;
    from `data`, the file's bytes already read, when given."""
    try:
        with (io.BytesIO(data) if data is not None else open(path, 'rb')) as f:
            return Image.open(f).convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f'cannot decode {path}: {e}') from None


# folder names that mark a data split, not a class: a class folder so named means --data_path is
# a dataset root whose splits would be pooled (pretraining on val) into a few "classes"
SPLIT_NAMES = frozenset({'train', 'training', 'val', 'valid', 'validation', 'test', 'testing', 'eval'})
TRAIN_NAMES = frozenset({'train', 'training'})


def is_hidden(name: str) -> bool:
    """Hidden entries (`.ipynb_checkpoints/`, macOS `._x.JPEG` resource forks, `.DS_Store`) are
    neither classes nor images: ImageNet has none, and a `._x.JPEG` is not a JPEG. So is the
    `__MACOSX/` folder of an archive zipped on a Mac (it holds only such `._` files)."""
    return name.startswith('.') or name == '__MACOSX'


def _has_images(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        if any(f.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(f) for f in files):
            return True
    return False


def _class_folder_iter(folder: Path) -> Iterator[Path]:
    if folder.is_dir():
        yield from (d for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name) and _has_images(d))


def class_folders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that hold images (at any depth), hidden ones left out."""
    return list(_class_folder_iter(folder))


def _refuse_dataset_root(root: Path, path: str, split: str) -> None:
    """Read as class folders, a dataset root would pool its splits (or several data sets) into a
    few classes and pretrain on all of them without a word: refuse that. A split is a split-named
    folder of class folders, or one of several folders that all have split names (train/ and val/
    of images); one class called `train` among others (CIFAR-100, VOC) is a class."""
    # folder names and one stat each, no walk through every class folder (the research notes'
    # ImageNet layout comes this way: 1,000 folders of 1,300 files)
    classes = [d for d in root.iterdir() if d.is_dir() and not is_hidden(d.name)]
    split_named = [d for d in classes if d.name.lower() in SPLIT_NAMES]
    splits = [d for d in split_named if next(_class_folder_iter(d), None) is not None]
    if not splits and len(split_named) == len(classes) > 1:
        splits = split_named
    splits = sorted(d.name + '/' for d in splits)
    nested = sorted(d.name + '/' for d in classes if any((d / s).is_dir() for s in SPLIT_NAMES))
    if splits or nested:
        what = (f'{", ".join(splits)} {"looks" if len(splits) == 1 else "look"} like data splits' if splits else
                f'{", ".join(nested[:5])} {"holds" if len(nested) == 1 else "hold"} data splits (train/, val/, ...)')
        raise DataLayoutError(
            f'--data_path {path} has no "{split}" folder of class folders, and its own sub-folders are not '
            f'classes either: {what}. Point --data_path at the folder that holds the class folders '
            f'(<data_path>/{split}/<class>/<image> or <data_path>/<class>/<image>)')


def require_data_path(path: str) -> Path:
    """`path` with ~ expanded; a DataLayoutError when it does not exist. Cheap, so the entry scripts
    call it before creating or locking their output folder (a mistyped --data_path leaves none)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataLayoutError(f'--data_path {path} does not exist')
    return root


def resolve_image_folder(path: str, split: str = 'train', refuse_a_dataset_root: bool = True) -> Path:
    """Folder whose sub-folders are the classes.

    Accepts the class folders directly (the research notes' `.../train/image_folders`),
    `<path>/<split>` (upstream's layout) and `<path>/<split>/image_folders`; the first unless
    its sub-folders look like data splits (`refuse_a_dataset_root`).
    """
    root = require_data_path(path)
    if not root.is_dir():
        raise DataLayoutError(f'--data_path {path} is a file; give the folder that holds the class folders '
                              f'(<data_path>/{split}/<class>/<image> or <data_path>/<class>/<image>)')
    candidates = [root / split / 'image_folders', root / split, root]
    for c in candidates:
        if next(_class_folder_iter(c), None) is not None:  # the first one found will do: no full listing
            if c == root and refuse_a_dataset_root:
                _refuse_dataset_root(root, path, split)
            if c == root and split == 'train' and root.resolve().name.lower() in SPLIT_NAMES - TRAIN_NAMES:
                print(f'note: --data_path {path} is named like an evaluation split, and is read as the training '
                      f'images; its parent folder would train on its train/ split')
            return c
    first_entries = itertools.islice(os.scandir(root), 1000)  # a look, not a listing of a huge folder
    if any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(e.name) for e in first_entries):
        raise DataLayoutError(f'--data_path {path} holds images, not class folders of images: it looks like one '
                              f'class; give the folder above it, which holds every class folder')
    tried = ', '.join(str(c) for c in candidates)
    raise DataLayoutError(
        f'no class folders with images found for split "{split}" under --data_path {path}. '
        f'Expected an ImageFolder layout: <data_path>/{split}/<class>/<image>.jpg, '
        f'<data_path>/{split}/image_folders/<class>/..., or <data_path>/<class>/... '
        f'(looked in: {tried})')


def sample_crop_boxes(heights, widths, generator: torch.Generator | None = None,
                      scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO,
                      tries: int = 10) -> torch.Tensor:
    """Crop boxes (B, 4) int64 CPU rows (top, left, h, w), distributed as torchvision's
    RandomResizedCrop.get_params for each (height, width): `tries` random (area, log-aspect)
    draws per sample, the first that fits is kept and placed uniformly; if none fits, the
    centre crop clamped to the ratio range. All samples at once. The uniforms come from
    `generator` (a CPU generator; None = the global RNG); the arithmetic is done in float64
    numpy, which avoids the thread-pool start-up torch pays on a few thousand elements."""
    H = np.asarray(torch.as_tensor(heights).reshape(-1).cpu(), dtype=np.float64)
    W = np.asarray(torch.as_tensor(widths).reshape(-1).cpu(), dtype=np.float64)
    n = H.size
    u = torch.rand(n, tries, 2, generator=generator, dtype=torch.float64).numpy()
    pos = torch.rand(n, 2, generator=generator, dtype=torch.float64).numpy()
    target_area = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.round(np.sqrt(target_area * aspect))  # round half to even, as Python's round
    h = np.round(np.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    found = fits.any(axis=1)
    first = fits.argmax(axis=1)[:, None]  # index of the first valid try
    w = np.take_along_axis(w, first, axis=1)[:, 0]
    h = np.take_along_axis(h, first, axis=1)[:, 0]
    top = np.minimum(np.floor(pos[:, 0] * (H - h + 1)), H - h)
    left = np.minimum(np.floor(pos[:, 1] * (W - w + 1)), W - w)

    # torchvision's fallback: the whole image, clamped to the ratio range, centred
    r_min, r_max = min(ratio), max(ratio)
    in_ratio = W / H
    fw = np.where(in_ratio > r_max, np.round(H * r_max), W)
    fh = np.where(in_ratio < r_min, np.round(W / r_min), H)
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    top = np.where(found, top, np.floor((H - h) / 2))
    left = np.where(found, left, np.floor((W - w) / 2))
    return torch.from_numpy(np.stack([top, left, h, w], axis=1).astype(np.int64))


def sample_flips(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool on the CPU: flip each sample with probability 0.5."""
    return torch.rand(n, generator=generator) < 0.5


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One generator seed per (run seed, epoch, sample)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63)


_NORMALIZE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """Float images on the 0..255 scale -> clamped to [0, 255] (PIL clips bicubic overshoot),
    /255, ImageNet mean/std normalisation. Every backend's last step, on the batch's device."""
    key = (x.device, x.dtype)
    if key not in _NORMALIZE_CACHE:  # made once per device: no host-to-device copy per batch
        _NORMALIZE_CACHE[key] = tuple(torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1).mul(255).to(x.device)
                                      for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORMALIZE_CACHE[key]
    return (x.clamp(0, 255) - mean) / std


class PretrainTransform:
    """Upstream's pretraining augmentation up to ToTensor: RandomResizedCrop(scale=(0.2, 1),
    bicubic) and horizontal flip, driven by an explicit generator. Returns uint8 (3, S, S);
    the /255 and ImageNet normalisation run on the training device (DeviceBatches)."""

    def __init__(self, input_size: int, scale: Sequence[float] = (0.2, 1.0)):
        self.input_size = input_size
        self.scale = tuple(scale)

    def __call__(self, img, gen: torch.Generator) -> torch.Tensor:
        width, height = img.size
        top, left, h, w = sample_crop_boxes([height], [width], gen, self.scale)[0].tolist()
        img = TF.resized_crop(img, top, left, h, w, [self.input_size, self.input_size],
                              interpolation=InterpolationMode.BICUBIC)
        if sample_flips(1, gen)[0]:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img)


class ClassFolder(datasets.ImageFolder):
    """ImageFolder whose class list can be imposed, so val labels use train's indices even when
    val lacks some classes; an empty class folder is a DataLayoutError; hidden folders and files
    (is_hidden) are skipped. Every dataset here is one."""

    def __init__(self, root: str | Path, transform=None, classes: Sequence[str] | None = None,
                 loader: Callable[[str], Any] = load_rgb):
        self.imposed_classes = list(classes) if classes is not None else None
        prefix = len(os.path.expanduser(str(root)).rstrip(os.sep)) + 1  # as torchvision expands the root
        hidden_part = os.sep + '.'  # path[prefix - 1:] starts at the separator after the root

        def is_image(path: str) -> bool:  # string tests: this runs once per file of the data set
            return path.lower().endswith(IMAGE_EXTENSIONS) and hidden_part not in path[prefix - 1:]
        try:
            super().__init__(str(root), transform=transform, loader=loader, is_valid_file=is_image,
                             allow_empty=classes is not None)
        except FileNotFoundError as e:  # no class folder, or one without images
            empty = [c for c in self.find_classes(root)[0] if not _has_images(Path(root) / c)]
            if not empty:
                raise DataLayoutError(f'{root}: {e}') from None
            raise DataLayoutError(
                f'{root}: no images in the class folder{"s" if len(empty) > 1 else ""} {", ".join(empty)} '
                f'(images: {", ".join(IMAGE_EXTENSIONS)}; hidden files such as ._x.JPEG are not images)') from None

    def find_classes(self, directory):
        if self.imposed_classes is None:
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not is_hidden(e.name))
            if not classes:
                raise FileNotFoundError(f'no class folder in {directory}')
            return classes, {c: i for i, c in enumerate(classes)}
        return self.imposed_classes, {c: i for i, c in enumerate(self.imposed_classes)}


class SeededImageFolder(ClassFolder):
    """ImageFolder whose items are addressed by (epoch, index) pairs from EpochSampler;
    the pair seeds that sample's augmentation."""

    def __init__(self, root: str | Path, transform: PretrainTransform, seed: int):
        super().__init__(root)
        self.pretrain_transform = transform
        self.seed = seed

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, target = self.samples[index]
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        img = self.loader(path)
        return self.pretrain_transform(img, gen), target


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also used with one process) yielding (epoch, index) pairs, so
    workers know the epoch even when they are persistent."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in super().__iter__():
            yield self.epoch, index


class DeviceBatches:
    """--data_backend pil as the engine sees every backend: (images, targets) on `device`,
    images float32 and normalised. The workers ship uint8 batches, a quarter of float32's bytes
    through shared memory, pinning and the host-to-device copy (and the CPU skips the float
    conversion); the normalisation is a few elementwise kernels on the device."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device | str):
        self.loader, self.device = loader, torch.device(device)
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in self.loader:  # images: (B, 3, S, S) uint8
            images = images.to(self.device, non_blocking=True)
            yield normalize_uint8_range(images.float()), targets.to(self.device, non_blocking=True)


def build_pretrain_loader(data_path: str, input_size: int, batch_size: int, seed: int,
                          num_workers: int, pin_mem: bool, world_size: int, rank: int,
                          device: torch.device | str = 'cpu') -> DeviceBatches:
    root = resolve_image_folder(data_path, 'train')
    dataset = SeededImageFolder(root, PretrainTransform(input_size), seed)
    if len(dataset) < batch_size * world_size:
        raise DataLayoutError(
            f'{root} has {len(dataset)} images, fewer than one batch per process '
            f'({batch_size} x {world_size}); lower --batch_size')
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                           seed=seed, drop_last=True)
    return DeviceBatches(torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=check_num_workers(num_workers),
        pin_memory=pin_mem, drop_last=True, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # the loader draws its workers' base seed when an iterator is built: once per run with
        # persistent workers, once per epoch without. From its own generator, not the global
        # torch RNG, so the masks' stream (restored on resume) does not depend on num_workers.
        generator=torch.Generator().manual_seed(seed)), device)


# =============================================================================================
# Evaluation data: fine-tuning, linear probing and kNN (run_finetune.py, run_linprobe.py,
# run_knn.py). Labelled train/val splits, their transforms, and samplers that see every
# validation image exactly once across processes.
# =============================================================================================
import torchvision.transforms as T  # noqa: E402 - kept with the section that uses it


def resolve_split_folder(path: str, split: str) -> Path:
    """Class folders of one labelled split: `<path>/<split>/<class>` or
    `<path>/<split>/image_folders/<class>`. Unlike pretraining, the split folder is required
    (labels come from the class folder names, so the train and val splits must be told apart)."""
    folder = resolve_image_folder(path, split, refuse_a_dataset_root=False)  # refused below, with its reason
    if folder == Path(path).expanduser():  # the class folders themselves: no split to choose
        raise DataLayoutError(
            f'--data_path {path} has no "{split}" split folder. Classification needs both splits: '
            f'<data_path>/train/<class>/<image> and <data_path>/val/<class>/<image> (or '
            f'<data_path>/<split>/image_folders/<class>/<image>)')
    return folder


def build_classification_datasets(data_path: str, train_transform, val_transform
                                  ) -> tuple[ClassFolder, ClassFolder]:
    """Train and val ImageFolders with one class index space (train's sorted class names)."""
    train_root = resolve_split_folder(data_path, 'train')
    val_root = resolve_split_folder(data_path, 'val')
    train_set = ClassFolder(train_root, train_transform)
    unknown = sorted(d.name for d in class_folders(val_root) if d.name not in train_set.class_to_idx)
    if unknown:
        raise DataLayoutError(f'{val_root} has classes that {train_root} lacks: {", ".join(unknown[:10])}')
    val_set = ClassFolder(val_root, val_transform, classes=train_set.classes)
    if len(val_set) == 0:
        raise DataLayoutError(f'{val_root} has no images of the training classes')
    absent = sorted(set(train_set.classes) - {train_set.classes[t] for t in set(val_set.targets)})
    if absent and is_main_process():
        print(f'note: {val_root} has no images of {len(absent)} of the {len(train_set.classes)} training classes '
              f'({", ".join(absent[:5])}{", ..." if len(absent) > 5 else ""}); val accuracy is over the others')
    return train_set, val_set


def eval_transform(input_size: int) -> T.Compose:
    """Upstream's evaluation transform: resize the short side to input_size / crop_pct
    (crop_pct = 224/256 up to 224 px, else 1), centre crop, normalise."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return T.Compose([
        T.Resize(int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def finetune_train_transform(input_size: int, color_jitter: float | None, auto_augment: str | None,
                             re_prob: float, re_mode: str, re_count: int):
    """Fine-tuning augmentation through timm's factory: RandomResizedCrop (bicubic), flip,
    RandAugment (or colour jitter when no policy is given), normalise, RandomErasing."""
    from timm.data import create_transform
    if auto_augment in ('', 'none', 'None'):
        auto_augment = None
    transform = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                 auto_augment=auto_augment, interpolation='bicubic', re_prob=re_prob,
                                 re_mode=re_mode, re_count=re_count, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    _clamp_posterize_bits(transform)
    return transform


def _posterize_zero_bits_black(img, bits_to_keep, **_):
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # every bit masked off, as older Pillow's posterize did
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits_to_keep))


def _clamp_posterize_bits(transform) -> None:
    """timm's RandAugment can ask Posterize for 0 bits (e.g. 'rand-m9-mstd0.5-inc1' when the
    sampled magnitude reaches 10), which recent Pillow (13 here) refuses with a ValueError in a loader
    worker, killing the run at random. The Pillow that upstream trained with masked off every bit,
    a black image; so does this. Patched on this transform's own ops, not in timm."""
    from timm.data.auto_augment import AugmentOp
    for t in getattr(transform, 'transforms', []):
        for op in getattr(t, 'ops', []):
            if isinstance(op, AugmentOp) and op.name.startswith('Posterize'):
                op.aug_fn = _posterize_zero_bits_black


class ClampedResizedCrop(T.RandomResizedCrop):
    """MAE's linear-probe crop: one draw of area and log-uniform aspect ratio, the box clamped
    to the image where it does not fit, instead of torchvision's ten tries and centre-crop
    fallback. Clamping keeps more of the image: on a 500x375 photo at scale (0.08, 1) the mean
    area fraction is about 0.52 here vs 0.44 with torchvision's crop."""

    @staticmethod
    def get_params(img, scale: list[float], ratio: list[float]) -> tuple[int, int, int, int]:
        width, height = TF.get_image_size(img)
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return top, left, h, w


def linprobe_train_transform(input_size: int) -> T.Compose:
    """MAE's weak linear-probe augmentation: its clamped RandomResizedCrop (bicubic), flip,
    normalise."""
    return T.Compose([
        ClampedResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... in order: each sample is seen exactly once over all
    processes (no padding, unlike DistributedSampler), so evaluation counts are exact."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_loader(dataset, batch_size: int, num_workers: int, pin_mem: bool, seed: int,
                       world_size: int, rank: int) -> torch.utils.data.DataLoader:
    """Shuffled (DistributedSampler, also with one process), full batches only."""
    if len(dataset) < batch_size * world_size:
        raise DataLayoutError(f'{dataset.root} has {len(dataset)} images, fewer than one batch per process '
                              f'({batch_size} x {world_size}); lower --batch_size')
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size,
                                       num_workers=check_num_workers(num_workers),
                                       pin_memory=pin_mem, drop_last=True, persistent_workers=num_workers > 0)


def build_eval_loader(dataset, batch_size: int, num_workers: int, pin_mem: bool, world_size: int = 1,
                      rank: int = 0) -> torch.utils.data.DataLoader:
    """In dataset order; with world_size > 1 each process gets its ShardSampler share. Its own
    generator: starting an epoch would otherwise draw from the global torch RNG, so evaluating
    between training epochs would change the training randomness that a resume restores."""
    sampler = ShardSampler(len(dataset), world_size, rank)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size,
                                       num_workers=check_num_workers(num_workers),
                                       pin_memory=pin_mem, drop_last=False, generator=torch.Generator())
