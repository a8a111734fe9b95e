"""The embedded demo data: scikit-learn's bundled 8x8 digits written as an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(folder: Path) -> Path:
    """Write the 1,797 digits as grey PNGs in one sub-folder per class (0-9); returns the folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        path = folder / str(label) / f"digit-{i:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)      # values 0..16 -> 0..255
        Image.fromarray(pixels, mode="L").save(path)
    return folder
