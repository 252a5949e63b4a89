"""Image grids as PNG files."""
from __future__ import annotations

import numpy as np
from PIL import Image


def grid(images: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """images f32 [N, S, S, C] in [0, 1] -> uint8 [rows*(S+pad)+pad, cols*(S+pad)+pad, C]."""
    n, s, _, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, c), 64, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        y, x = pad + r * (s + pad), pad + k * (s + pad)
        out[y:y + s, x:x + s] = np.clip(im * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def save_grid(path: str, images: np.ndarray, cols: int, scale: int = 1) -> None:
    g = grid(images, cols)
    im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
