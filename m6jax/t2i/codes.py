"""Image codes made once by `experiments/encode_codes.py`, read by the text-to-image tasks.

  OUT/<image-text file name>.codes.npy   int32 [records, num_codes]: the image tokenizer's
                                         codes of that file's records, in file order
  OUT/codes.json                         {"vq_from", "codebook_size", "num_codes"}

With `data.codes_dir=OUT` a text-to-image run reads its codes from there (a memory map
per file, opened when a row of it is first drawn) and never runs the VQ encoder at
start-up; '' encodes every image at start-up as before (fine for the digits, not for
a corpus). A record whose image cannot be read is encoded as a black image, as at
start-up; the tasks never draw it (the pipeline skips bad records).
"""
from __future__ import annotations

import json
import os

import numpy as np

from m6jax.errors import InputError

MANIFEST = "codes.json"
FIELD = "data.codes_dir"


def codes_path(out_dir: str, image_file: str) -> str:
    return os.path.join(out_dir, os.path.basename(image_file) + ".codes.npy")


def encode_files(tokenizer, vq_from: str, images, file_indices, out_dir: str,
                 batch: int = 256) -> list[str]:
    """Encodes the records of files `file_indices` of `images` (a vq.data.TokenizerImages
    at the tokenizer's size) with `tokenizer` (vq.load.ImageTokenizer of `vq_from`);
    writes one .codes.npy per file and the manifest. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    src, written = images.source, []
    names = [os.path.basename(f) for f in src.files]
    if len(set(names)) != len(names):
        raise InputError("data.image_text_files: two files share a name; codes are stored "
                         "by file name, rename one")
    for i in file_indices:
        rows = np.arange(src.offsets[i], src.offsets[i + 1])
        codes = np.concatenate([tokenizer.encode(images.batch(rows[s:s + batch]))
                                for s in range(0, len(rows), batch)]).astype(np.int32)
        path = codes_path(out_dir, src.files[i])
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, codes)
        os.replace(tmp, path)
        written.append(path)
    manifest = dict(vq_from=os.path.abspath(vq_from), num_codes=tokenizer.num_codes,
                    codebook_size=tokenizer.codebook_size)
    tmp = os.path.join(out_dir, f"{MANIFEST}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))  # every process writes the same
    return written


class StoredCodes:
    """`codes[row]` -> int32 [num_codes] for a global row of `source` (ImageTextSource)."""

    def __init__(self, codes_dir: str, source, num_codes: int, codebook_size: int):
        self.dir, self.files, self.offsets = codes_dir, list(source.files), source.offsets
        self.sizes = [len(p) for p in source.parts]
        try:
            with open(os.path.join(codes_dir, MANIFEST), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{FIELD}={codes_dir!r} has no readable {MANIFEST} ({e}); make it "
                             "with python experiments/encode_codes.py") from None
        if (manifest.get("num_codes"), manifest.get("codebook_size")) != (num_codes, codebook_size):
            raise InputError(f"{FIELD}={codes_dir!r} holds codes of {manifest.get('num_codes')} "
                             f"per image from {manifest.get('codebook_size')} entries, data.vq_from "
                             f"makes {num_codes} from {codebook_size}; re-encode with this vq_from")
        self.num_codes, self._open = num_codes, {}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # workers reopen their maps

    def _file(self, part: int) -> np.ndarray:
        if part not in self._open:
            path = codes_path(self.dir, self.files[part])
            try:
                codes = np.asarray(np.load(path, mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise InputError(f"{FIELD}: {path} (the codes of {self.files[part]}) cannot be "
                                 f"read ({e}); run experiments/encode_codes.py") from None
            if codes.shape != (self.sizes[part], self.num_codes):
                raise InputError(f"{FIELD}: {path} holds {codes.shape} codes, {self.files[part]} "
                                 f"{self.sizes[part]} records of {self.num_codes}; re-encode it")
            self._open[part] = codes
        return self._open[part]

    def __getitem__(self, row: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return np.array(self._file(part)[int(row - self.offsets[part])])
