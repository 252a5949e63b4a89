"""Image records -> float arrays -> flattened patches."""
import os

import numpy as np
from PIL import Image


def load_image(value, base_dir: str, image_size: int, channels: int) -> np.ndarray:
    """One record's `image` field as float32 [image_size, image_size, channels] in [0, 1].

    `value` is a nested list (H x W or H x W x C floats in [0, 1]) or a path to an image
    file, relative paths resolved against `base_dir` (the directory of the data file).
    """
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return (np.asarray(im, np.float32) / 255.0).reshape(image_size, image_size, channels)
    image = np.asarray(value, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"data.image_text_files: image of shape {image.shape} is not H x W or H x W x 1|3")
    if image.size and not 0.0 <= image.min() <= image.max() <= 1.0:
        raise ValueError(f"data.image_text_files: image values must lie in [0, 1], got "
                         f"[{image.min()}, {image.max()}]; divide 0..255 pixels by 255")
    if image.shape[2] != channels:
        image = image.mean(-1, keepdims=True) if channels == 1 else np.repeat(image, 3, axis=-1)
    if image.shape[:2] != (image_size, image_size):
        # PIL's float mode resizes one channel at a time.
        image = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
            (image_size, image_size), Image.BILINEAR)) for c in range(channels)], axis=-1)
    return image


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[S, S, C] -> [(S // p) ** 2, p * p * C]: non-overlapping patches, row-major grid.

    Within a patch the order is (row, column, channel), i.e. each patch is the
    [p, p, C] block flattened.
    """
    size, _, channels = image.shape
    grid = size // patch_size
    blocks = image.reshape(grid, patch_size, grid, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(grid * grid, patch_size * patch_size * channels)
