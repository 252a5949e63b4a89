"""The preprocessed image format: decoded, resized uint8 pixels, read without decoding.

A shard is two files, written by `make_shards.py --format=preprocessed`:
  shard-00000.npy        uint8 [N, M, M, C] in numpy's .npy layout (a short header,
                         then the raw array): each image decoded, resized so its shorter
                         side is M and centre-cropped to a square, M = --image_size +
                         --crop_margin (a margin > 0 leaves room for random crops)
  shard-00000.npy.meta   one JSON object a line per record: caption, lang, label
The reader memory-maps the .npy (`np.load(mmap_mode='r')` reads only the header), so a
record is a slice of the page cache and the crop is a view; the metadata is read on the
first record. JPEG decoding is the cost this format removes: it is paid once, here.
We chose raw .npy over ArrayRecord (installed, Grain's native format) because a fixed
record size needs no record index or per-record parse, and numpy alone reads it.
"""
import json

import numpy as np

from m6jax.data import captions, images
from m6jax.errors import InputError

SUFFIX = ".npy"
META_SUFFIX = ".meta"  # appended: shard-00000.npy.meta
FIELD = "data.image_text_files"


class PixelShard:
    """A preprocessed shard: `row(i)['image']` is uint8 [M, M, C] (a memory-map view)."""

    def __init__(self, path: str):
        self.path = path
        try:
            # A plain ndarray view of the map: numpy's memmap subclass makes every
            # operation on a record ~7x slower (measured: 0.30 vs 0.04 ms at 224 px).
            self.pixels = np.asarray(np.load(path, mmap_mode="r"))
        except (OSError, ValueError) as e:
            raise InputError(f"{FIELD}: {path} is not a readable .npy shard ({e}); fix or "
                             "remove it") from None
        shape = self.pixels.shape
        if self.pixels.dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
            raise InputError(f"{FIELD}: {path} holds {self.pixels.dtype} {shape}, not uint8 "
                             "[N, M, M, 1|3]; write it with make_shards.py --format=preprocessed")
        self._metas = None

    def __getstate__(self):
        # A memory map pickles as a full copy of the shard: Grain's workers reopen it.
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __len__(self):
        return len(self.pixels)

    def metas(self) -> list[dict]:
        if self._metas is None:
            meta = self.path + META_SUFFIX
            try:
                with open(meta, encoding="utf-8") as f:
                    self._metas = [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError) as e:
                raise InputError(f"{FIELD}: {meta} (the captions of {self.path}) cannot be "
                                 f"read ({e}); rewrite the shard") from None
            if len(self._metas) != len(self.pixels):
                raise InputError(f"{FIELD}: {meta} has {len(self._metas)} records, "
                                 f"{self.path} {len(self.pixels)}; rewrite the shard")
        return self._metas

    def row(self, i: int) -> dict:
        rec = dict(self.metas()[i])
        rec["image"] = self.pixels[i]
        return rec

    def captions(self):
        for m in self.metas():
            yield m.get("caption")


def write(chunk: list[dict], path: str, image_size: int, channels: int, crop_margin: int,
          load, meta) -> None:
    """Writes records `chunk` as the shard `path` (+ its `.meta`): `load(rec)` gives a
    record's encoded image (a file or file object), `meta(rec)` its metadata dict."""
    side = image_size + crop_margin
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                       shape=(len(chunk), side, side, channels))
    with open(path + META_SUFFIX, "w", encoding="utf-8") as f:
        for i, rec in enumerate(chunk):
            pixels[i] = images.decode_pixels(load(rec), side, channels)
            m = meta(rec)
            # Languages found once here, not on every read.
            m.setdefault("lang", [captions.detect_lang(c) for c in m["caption"]])
            f.write(json.dumps(m, ensure_ascii=False) + "\n")
    pixels.flush()
    del pixels
