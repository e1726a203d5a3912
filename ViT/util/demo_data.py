"""A small real-photo ImageFolder made from scikit-image's bundled pictures, for the demo
and the tests: each picture is one class, each image a random crop of it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# bundled with scikit-image (no download); grey pictures are repeated over 3 channels
PICTURES = ['astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
            'stereo_motorcycle', 'camera', 'coins', 'grass', 'gravel', 'brick']


def _load_picture(name: str) -> np.ndarray | None:
    import skimage.data
    try:
        img = getattr(skimage.data, name)()
    except Exception:  # noqa: BLE001 - a picture that needs a download is simply skipped
        return None
    img = img[0] if isinstance(img, tuple) else img
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def make_demo_dataset(root: str | Path, num_classes: int = 8, images_per_class: int = 24,
                      size: int = 96, seed: int = 0) -> Path:
    """Writes <root>/train/<class>/<n>.jpg and <root>/val/<class>/<n>.jpg (a quarter as many)
    once; returns root. Crops cover 30-100% of the shorter side at random positions."""
    root = Path(root)
    if (root / 'train').is_dir() and any((root / 'train').iterdir()):
        return root
    rng = np.random.default_rng(seed)
    made = 0
    for name in PICTURES:
        if made == num_classes:
            break
        picture = _load_picture(name)
        if picture is None:
            continue
        h, w = picture.shape[:2]
        for split, count in (('train', images_per_class), ('val', max(images_per_class // 4, 1))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                side = int(min(h, w) * rng.uniform(0.3, 1.0))
                top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
                crop = Image.fromarray(picture[top:top + side, left:left + side])
                crop.resize((size, size), Image.BICUBIC).save(folder / f'{n:03d}.jpg', quality=90)
        made += 1
    if made < 2:
        raise SystemExit('error: scikit-image provided fewer than 2 bundled pictures; cannot make demo data')
    return root
