"""One start-of-run line saying what the model's images are made from, and a warning when
the config throws colour or resolution away (a user's RGB photos into the 8x8 grey tiny
config, silently, was the surprise this prevents)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def source_image_info(value, base_dir: str = "") -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of one record's image as stored: a path, encoded bytes
    ({"bytes", "path"}), or a nested list / array (H x W or H x W x C)."""
    if isinstance(value, dict):  # parquet's {"bytes", "path"} (Hugging Face's Image feature)
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, bytes)):
        src = io.BytesIO(value) if isinstance(value, bytes) else (
            value if os.path.isabs(value) else os.path.join(base_dir, value))
        with Image.open(src) as im:
            channels = 1 if im.mode in ("L", "1", "I", "F", "I;16") else 3
            return channels, (im.height, im.width)
    a = np.asarray(value)
    return (1 if a.ndim == 2 else int(a.shape[2])), (int(a.shape[0]), int(a.shape[1]))


def image_notice(channels: int, hw: tuple[int, int], settings: dict) -> tuple[str, str | None]:
    """(info line, warning or None) for source images of `channels` x `hw` under the data
    settings (`image_size`, `image_channels`, `patch_size`)."""
    size, ch, p = settings["image_size"], settings["image_channels"], settings["patch_size"]
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    grid = size // p
    line = (f"images: {kind} {hw[0]}x{hw[1]} -> {ch} channel{'s' if ch > 1 else ''}, resized to "
            f"{size}x{size}, {grid * grid} patches of {p}x{p}")
    lost = []
    if channels == 3 and ch == 1:
        lost.append("colour (data.image_channels=3 keeps it)")
    if min(hw) > size:
        lost.append(f"resolution ({min(hw)} px -> {size}; data.image_size sets it)")
    warning = f"images lose {' and '.join(lost)}" if lost else None
    return line, warning
