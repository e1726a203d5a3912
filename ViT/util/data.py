"""Datasets, folder layouts and the pretraining input pipeline.

Augmentation randomness is a pure function of (seed, epoch, sample index): every sample's
crop and flip come from its own generator. That makes runs reproducible whatever the
number of workers, and an interrupted run resumes with exactly the same inputs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.utils.data
import torchvision.datasets as datasets
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = tuple(datasets.folder.IMG_EXTENSIONS)


class DataLayoutError(SystemExit):
    """Raised with a message for the user when a data folder is missing or malformed."""

    def __init__(self, message: str):
        super().__init__('error: ' + message)


def _has_images(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(d.is_dir() and _has_images(d) for d in folder.iterdir())


def resolve_image_folder(path: str, split: str = 'train') -> Path:
    """Folder whose sub-folders are the classes.

    Accepts the class folders directly (the research notes' `.../train/image_folders`),
    `<path>/<split>` (upstream's layout) and `<path>/<split>/image_folders`.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataLayoutError(f'--data_path {path} does not exist')
    candidates = [root / split, root / split / 'image_folders', root]
    for c in candidates:
        if _has_class_folders(c):
            return c
    tried = ', '.join(str(c) for c in candidates)
    raise DataLayoutError(
        f'no class folders with images found for split "{split}" under --data_path {path}. '
        f'Expected an ImageFolder layout: <data_path>/{split}/<class>/<image>.jpg, '
        f'<data_path>/{split}/image_folders/<class>/..., or <data_path>/<class>/... '
        f'(looked in: {tried})')


def sample_resized_crop(gen: torch.Generator, height: int, width: int,
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3. / 4., 4. / 3.)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with the distribution of torchvision's RandomResizedCrop.get_params,
    drawn from `gen` (10 tries at a random area/aspect, then a centre crop fallback)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One generator seed per (run seed, epoch, sample)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63)


class PretrainTransform:
    """Upstream's pretraining augmentation: RandomResizedCrop(scale=(0.2, 1), bicubic),
    horizontal flip, ToTensor, ImageNet normalisation, driven by an explicit generator."""

    def __init__(self, input_size: int, scale: Sequence[float] = (0.2, 1.0)):
        self.input_size = input_size
        self.scale = tuple(scale)

    def __call__(self, img, gen: torch.Generator) -> torch.Tensor:
        width, height = img.size
        top, left, h, w = sample_resized_crop(gen, height, width, self.scale)
        img = TF.resized_crop(img, top, left, h, w, [self.input_size, self.input_size],
                              interpolation=InterpolationMode.BICUBIC)
        if torch.rand(1, generator=gen).item() < 0.5:
            img = TF.hflip(img)
        x = TF.to_tensor(img)
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


class SeededImageFolder(datasets.ImageFolder):
    """ImageFolder whose items are addressed by (epoch, index) pairs from EpochSampler;
    the pair seeds that sample's augmentation."""

    def __init__(self, root: str | Path, transform: PretrainTransform, seed: int):
        super().__init__(str(root))
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


def build_pretrain_loader(data_path: str, input_size: int, batch_size: int, seed: int,
                          num_workers: int, pin_mem: bool, world_size: int, rank: int
                          ) -> torch.utils.data.DataLoader:
    root = resolve_image_folder(data_path, 'train')
    dataset = SeededImageFolder(root, PretrainTransform(input_size), seed)
    if len(dataset) < batch_size * world_size:
        raise DataLayoutError(
            f'{root} has {len(dataset)} images, fewer than one batch per process '
            f'({batch_size} x {world_size}); lower --batch_size')
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                           seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
        pin_memory=pin_mem, drop_last=True, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None)
