"""Image records -> float arrays -> flattened patches.

An encoded image (a path, or JPEG/PNG/WebP bytes) of any size is resized so its shorter
side is `image_size` (aspect kept) and cut to an `image_size` square: at a random offset
along the longer side for training (`rng` given), at the centre for evaluation. A square
image is therefore resized exactly as before crops existed. RGB is then normalised with
the ImageNet mean and std (what a CNN backbone expects); grey stays in [0, 1] (what the
digits and the quickstart were trained on).
"""
import functools
import io
import os

import numpy as np
from PIL import Image

# ImageNet statistics of [0, 1] RGB pixels.
RGB_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
RGB_STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_image(value, base_dir: str, image_size: int, channels: int,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """One record's `image` field as float32 [image_size, image_size, channels].

    `value` is a nested list (H x W or H x W x C floats in [0, 1]), a path to an image
    file (relative paths resolved against `base_dir`, the directory of the data file),
    encoded bytes, or a Hugging Face image dict {'bytes': ..., 'path': ...}. `rng` picks
    the training crop; None = centre crop. Raises OSError / ValueError if unreadable.
    """
    if isinstance(value, dict):  # datasets' Image feature as stored in parquet
        value = value.get("bytes") or value.get("path")
        if value is None:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:  # the preprocessed format
        return normalise(from_pixels(value, image_size, channels, rng))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return normalise(decode(io.BytesIO(bytes(value)), image_size, channels, rng))
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        return normalise(decode(path, image_size, channels, rng))
    return normalise(_from_array(value, image_size, channels))


def decode(file, image_size: int, channels: int, rng=None) -> np.ndarray:
    """A JPEG/PNG/WebP file or file object -> float32 [S, S, C] in [0, 1], resized and
    cropped as the module docstring says."""
    return decode_pixels(file, image_size, channels, rng).astype(np.float32) / 255.0


def decode_pixels(file, image_size: int, channels: int, rng=None) -> np.ndarray:
    """`decode` before the division by 255: uint8 [S, S, C] (what the preprocessed
    format stores, so its images are bitwise those of the JPEG path)."""
    with Image.open(file) as im:
        # JPEG decodes at 1/2, 1/4 or 1/8 scale in libjpeg when that still covers the
        # target: several times faster on photos far larger than image_size.
        im.draft("L" if channels == 1 else "RGB", (image_size, image_size))
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        scale = image_size / min(w, h)
        size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
        x0, y0 = _crop_offset(size[0] - image_size, rng), _crop_offset(size[1] - image_size, rng)
        if size != (image_size, image_size):
            im = im.crop((x0, y0, x0 + image_size, y0 + image_size))
        return np.asarray(im, np.uint8).reshape(image_size, image_size, channels)


def from_pixels(pixels: np.ndarray, image_size: int, channels: int, rng=None) -> np.ndarray:
    """Stored uint8 pixels [M, M, C] (M >= image_size) -> float32 [S, S, C] in [0, 1]:
    an S-square window at a random offset (`rng`) or the centre, no decoding. Raises
    ValueError naming the data field when the stored images do not fit the config."""
    size, width, stored_channels = pixels.shape
    if stored_channels != channels:
        raise ValueError(f"stored images have {stored_channels} channel(s), "
                         f"data.image_channels={channels}; rewrite them with make_shards.py "
                         f"--channels={channels}")
    if size < image_size or width != size:
        raise ValueError(f"stored images are {size}x{width} px, smaller than or not square as "
                         f"data.image_size={image_size}; rewrite them with make_shards.py "
                         f"--image_size={image_size}")
    x0, y0 = _crop_offset(size - image_size, rng), _crop_offset(size - image_size, rng)
    image = pixels[y0:y0 + image_size, x0:x0 + image_size].astype(np.float32)
    image /= 255.0  # in place: one array, not two (the same division as `decode`'s)
    return image


def _crop_offset(slack: int, rng) -> int:
    if slack <= 0:
        return 0  # no draw: square images use no randomness
    return int(rng.integers(slack + 1)) if rng is not None else slack // 2


def normalise(image: np.ndarray) -> np.ndarray:
    """[..., W, C] in [0, 1] -> the model's input: RGB standardised, grey unchanged."""
    if image.shape[-1] != 3:
        return image
    # (image - mean) / std on rows of W * 3 values: the same float32 operations, 8x
    # faster than broadcasting over a last axis of 3 (numpy's inner loop is 3 long).
    width = image.shape[-2]
    mean, std = _rgb_rows(width)
    rows = np.subtract(image.reshape(*image.shape[:-2], width * 3), mean)
    return np.divide(rows, std, out=rows).reshape(image.shape)


@functools.lru_cache(maxsize=8)
def _rgb_rows(width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(RGB_MEAN, width), np.tile(RGB_STD, width)


def denormalise(image: np.ndarray) -> np.ndarray:
    """The model's input -> [0, 1] pixels (for showing it): `normalise` undone."""
    if image.shape[-1] == 3:
        return image * RGB_STD + RGB_MEAN
    return image


def _from_array(value, image_size: int, channels: int) -> np.ndarray:
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


def model_input(path: str, data_cfg, invert: str = "auto") -> np.ndarray:
    """An image file -> patches f32 [P, patch_dim], preprocessed as the run's training
    images (generate.py --image). invert: yes | no | auto, which inverts a light
    background only for a run on the shipped digits (bright ink on black, no
    data.image_text_files): a run on your photos saw them as they are."""
    image = load_image(path, "", data_cfg.image_size, data_cfg.image_channels)
    digits = not data_cfg.image_text_files
    if invert == "yes" or (invert == "auto" and digits and image.mean() > 0.5):
        image = normalise(1.0 - denormalise(image))
    return patchify(image, data_cfg.patch_size).astype(np.float32)


def save_model_input(path: str, patches, data_cfg, scale: int = 8) -> None:
    """The model's view of each image of patches [N, P, patch_dim], in pixels (normalising
    undone), nearest-neighbour enlarged `scale` x so an 8x8 grid is visible, side by side
    in one PNG (generate.py --show_input)."""
    size, p, ch = data_cfg.image_size, data_cfg.patch_size, data_cfg.image_channels
    g = size // p
    imgs = patches.reshape(-1, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(-1, size, size, ch)
    imgs = denormalise(imgs)
    row = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=0.5) for im in imgs], 1)
    row = np.repeat(np.repeat(np.clip(row, 0, 1), scale, 0), scale, 1)
    pixels = (row * 255).round().astype(np.uint8)
    Image.fromarray(pixels[..., 0] if ch == 1 else pixels).save(path)
    print(f"model input ({len(imgs)} image(s), {size}x{size}x{ch}, shown {scale}x): {path}")
