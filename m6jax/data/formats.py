"""The four on-disk layouts of image-caption records, each read as a list of records.

  jsonl / json   one JSON object a line: `image` (path or nested list), `caption`, ...
  parquet        the same columns; `image` a path, encoded bytes, or {'bytes', 'path'}
  webdataset     .tar shards: members `KEY.jpg|.jpeg|.png|.webp` + `KEY.txt` (the caption)
                 or `KEY.json` ({"caption": ..., optional "lang", "label"})
  folder         a captions file (.tsv): `relative/image/path<TAB>caption[<TAB>caption...]`
                 a line, paths relative to the captions file's directory
  preprocessed   .npy shards of decoded uint8 pixels + `.npy.meta` captions
                 (m6jax/data/preprocessed.py): read without decoding

The format is `data.image_text_format`, or by a file's extension when that is ''. Every
part answers `len(part)`, `part.row(i)` (a dict with at least `image` and `caption`, the
image still encoded) and `part.captions()`; decoding happens later, in the loader's
workers. A tar shard is indexed once (member offsets) and read by seek, so random access
costs one read per image. A tar or .npy shard listed in its folder's `shards.json`
(shard_index.py) is a `LazyShard`: sized from the index, opened on its first row.
"""
import json
import os
import tarfile

from m6jax.errors import InputError

FORMATS = ("jsonl", "parquet", "webdataset", "folder", "preprocessed")
BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tar": "webdataset",
             ".tsv": "folder", ".npy": "preprocessed"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
FIELD = "data.image_text_files"


def format_of(path: str, forced: str = "") -> str:
    """The format of `path`: `forced` (data.image_text_format) or by its extension."""
    if forced:
        return forced
    fmt = BY_SUFFIX.get(os.path.splitext(path)[1])
    if fmt is None:
        raise InputError(f"{FIELD}: {path!r} has no known extension ({', '.join(BY_SUFFIX)}); "
                         f"name it so or set data.image_text_format to one of {', '.join(FORMATS)}")
    return fmt


class TarShard:
    """A webdataset shard: samples grouped by key, in member order."""

    def __init__(self, path: str):
        self.path = path
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    key, _, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(m.name), key)
                    sample = samples.setdefault(key, {"key": key})
                    ext = "." + ext.lower()
                    if ext in IMAGE_EXTS:
                        sample["image_at"] = (m.offset_data, m.size)
                    elif ext in (".txt", ".json"):
                        sample[ext] = tf.extractfile(m).read().decode("utf-8", errors="replace")
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"{FIELD}: {path} is not a readable tar shard ({e}); fix or "
                             "remove it") from None
        self.samples = list(samples.values())

    def __len__(self):
        return len(self.samples)

    def row(self, i: int) -> dict:
        s = self.samples[i]
        rec = {"caption": s.get(".txt")}
        if ".json" in s:
            meta = json.loads(s[".json"])
            if not isinstance(meta, dict):
                raise ValueError(f"{s['key']}.json is not a JSON object")
            rec.update(meta)
        if "image_at" not in s:
            raise ValueError(f"sample {s['key']!r} has no {'/'.join(IMAGE_EXTS)} member")
        offset, size = s["image_at"]
        with open(self.path, "rb") as f:
            f.seek(offset)
            rec["image"] = f.read(size)
        return rec

    def captions(self):
        for s in self.samples:
            if ".json" in s:
                try:
                    yield json.loads(s[".json"]).get("caption")
                except (ValueError, AttributeError):
                    continue
            else:
                yield s.get(".txt")


class LazyShard:
    """A shard of `size` records (from shards.json), opened by `opener(path)` when a row
    or caption of it is first read; pickled (to Grain's workers) unopened."""

    def __init__(self, path: str, opener, size: int):
        self.path, self.opener, self.size, self._part = path, opener, size, None

    def part(self):
        if self._part is None:
            part = self.opener(self.path)
            if len(part) != self.size:
                raise InputError(f"{FIELD}: {self.path} has {len(part)} records, its "
                                 f"shards.json {self.size}; rewrite the shards or delete "
                                 "shards.json")
            self._part = part
        return self._part

    def __getstate__(self):
        return {**self.__dict__, "_part": None}

    def __len__(self):
        return self.size

    def row(self, i: int) -> dict:
        return self.part().row(i)

    def captions(self):
        return self.part().captions()


class CaptionsFile:
    """An image folder named by a captions file (tab-separated, one image a line)."""

    def __init__(self, path: str):
        self.path, self.base_dir = path, os.path.dirname(os.path.abspath(path))
        self.lines = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    image, *caps = line.rstrip("\n").split("\t")
                    self.lines.append((image.strip(), caps))
        if not self.lines:
            raise InputError(f"{FIELD}: {path} has no line; write `image_path<TAB>caption` lines")

    def __len__(self):
        return len(self.lines)

    def row(self, i: int) -> dict:
        image, caps = self.lines[i]
        return {"image": image, "caption": caps if len(caps) != 1 else caps[0]}

    def captions(self):
        for _, caps in self.lines:
            yield caps


class TableFile:
    """A jsonl/parquet file loaded through Hugging Face `datasets`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def row(self, i: int) -> dict:
        return self.dataset[i]

    def captions(self, chunk: int = 10_000):
        for start in range(0, len(self.dataset), chunk):
            yield from self.dataset[start:start + chunk]["caption"]
