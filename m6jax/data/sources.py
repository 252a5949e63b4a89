"""Text and image-text sources loaded from local files through Hugging Face `datasets`.

Text records: `text` (optional `label`, `source`); .txt files give one text a line.
Image-text records: `image` (nested list or image path) and `caption` (a string or a
list of alternative captions), optional `lang` (string or list aligned with `caption`;
guessed from the script when absent) and `label` (int, -1 if unknown).

Bad records are counted and skipped, never fatal one by one: an empty or over-long
text is dropped at load (`TextSource.num_bad`); an image-text record whose image cannot
be read or whose fields are malformed raises `BadRecord` from `record`, which the
pipeline counts and redraws. Only a source with nothing valid left is an error.

Splits never depend on the run seed: a text is held out iff crc32(text) % 50 == 0
(~2%, and duplicates land on the same side); image-text records are held out by a
fixed seed-0 permutation: its first min(20%, data.eval_records) rows.
"""
import json
import os
import zlib

import numpy as np
from absl import logging

from m6jax.data import captions, formats, images, preprocessed, shard_index
from m6jax.data.config import expand_globs  # noqa: F401 (where it used to live)
from m6jax.errors import InputError

TEXT_HOLDOUT_MODULUS = 50
IMAGE_HOLDOUT_FRACTION = 0.2
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _datasets():
    # Everything is local; never let `datasets` reach for the Hub (no network here,
    # and a timeout would stall start-up for minutes).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets


def _load(builder, files, cache_dir, field: str):
    """A `datasets` Dataset of `files`; a JSON-lines file with malformed lines is parsed
    line by line instead (`malformed_lines` counts what was dropped). Returns
    (dataset, malformed_lines)."""
    try:
        ds = _datasets().load_dataset(builder, data_files=files, split="train",
                                      cache_dir=os.path.join(cache_dir, "hf_datasets"))
        return ds, 0
    except Exception as e:  # noqa: BLE001 (datasets wraps parse errors in its own types)
        error = e
    if builder == "json":
        records, bad = [], 0
        for f in files:
            got, n_bad = _json_lines(f, field)
            records += got
            bad += n_bad
        if records:
            logging.warning("%s: %d malformed line(s) in %s counted as bad records and "
                            "skipped", field, bad, ", ".join(files))
            return _datasets().Dataset.from_list(records), bad
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause).strip():
        reason += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]})"
    raise InputError(f"{field}: {', '.join(files)} cannot be read ({reason}); fix or remove it")


def _json_lines(path: str, field: str) -> tuple[list[dict], int]:
    """The JSON-object lines of `path` and the count of lines that are not one; refuses
    a file without any valid line (naming it)."""
    records, bad, first_bad = [], 0, ""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                rec, why = None, f"line {number}: {e}"
            else:
                why = f"line {number}: not a JSON object"
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
                first_bad = first_bad or why
    if not records:
        raise InputError(f"{field}: {path} has no valid JSON-lines record ({bad} malformed; "
                         f"first: {first_bad or 'no non-blank line'}); one JSON object per line")
    return records, bad


class BadRecord(ValueError):
    """An image-text record that cannot be used; the message names file, row and why."""


class TextSource:
    """Texts from .txt/.jsonl/.parquet files; `train` and `heldout` are row indices."""

    def __init__(self, files: list[str], cache_dir: str, max_chars: int = 20_000):
        by_builder, self.num_malformed = {}, 0
        for f in files:
            by_builder.setdefault(_BUILDERS[os.path.splitext(f)[1]], []).append(f)
        parts = []
        for builder, group in by_builder.items():
            ds, malformed = _load(builder, group, cache_dir, "data.text_files")
            self.num_malformed += malformed
            if "text" not in ds.column_names:
                raise InputError(f"data.text_files: {', '.join(group)} have no 'text' field "
                                 f"(columns: {ds.column_names}); give each record a 'text'")
            parts.append(ds.select_columns(["text"]))
        self.dataset = parts[0] if len(parts) == 1 else _datasets().concatenate_datasets(parts)
        train, heldout, self.num_empty, self.num_too_long = [], [], 0, 0
        for start, batch in _iter_column(self.dataset, "text"):
            for i, text in enumerate(batch, start):
                if not text or not text.strip():
                    self.num_empty += 1  # never sampled
                elif len(text) > max_chars:
                    self.num_too_long += 1  # never sampled
                elif zlib.crc32(text.encode("utf-8")) % TEXT_HOLDOUT_MODULUS == 0:
                    heldout.append(i)
                else:
                    train.append(i)
        self.train, self.heldout = np.array(train, np.int64), np.array(heldout, np.int64)
        self.num_bad = self.num_empty + self.num_too_long + self.num_malformed
        if not len(self.train) or not len(self.heldout):
            raise InputError(f"data.text_files: need texts in both splits, got {len(self.train)} "
                             f"train / {len(self.heldout)} held out ({self.num_empty} empty, "
                             f"{self.num_too_long} over data.max_text_chars={max_chars}) "
                             f"from {', '.join(files)}; add more valid text")

    def texts(self, rows) -> list[str]:
        return self.dataset[[int(r) for r in rows]]["text"] if len(rows) else []


def _iter_column(ds, column, chunk=10_000):
    for start in range(0, len(ds), chunk):
        yield start, ds[start:start + chunk][column]


class ImageTextSource:
    """Image-caption records; each file is loaded on its own so schemas may differ.

    `files` may mix the four layouts of `formats.py` (`fmt` forces one). With several
    processes and at least as many files, process i trains only on the files i, i + n,
    ... (`host_train`): hosts read disjoint shards that together cover the data. With
    fewer files every host draws from all of them, so the global batch stays a function
    of the step alone. Held-out rows always span all files (every host builds the same
    eval set): at most `eval_records` of them. Shards listed in a shards.json are opened
    only when first read (formats.LazyShard), so a host opens only the shards it draws.
    """

    def __init__(self, files: list[str], cache_dir: str, image_size: int, channels: int,
                 max_chars: int = 20_000, fmt: str = "", process_index: int = 0,
                 process_count: int = 1, eval_records: int = 1000):
        self.image_size, self.channels, self.max_chars = image_size, channels, max_chars
        self.files, self.parts, self.base_dirs, sizes = list(files), [], [], []
        self.num_malformed = 0  # JSON lines that are not a record: counted, never sampled
        for f in files:
            kind = formats.format_of(f, fmt)
            opener = {"webdataset": formats.TarShard,
                      "preprocessed": preprocessed.PixelShard}.get(kind)
            indexed = opener and shard_index.records(f)
            if indexed:
                part = formats.LazyShard(f, opener, indexed)
            elif opener:
                part = opener(f)
            elif kind == "folder":
                part = formats.CaptionsFile(f)
            else:
                ds, malformed = _load(_BUILDERS[".parquet" if kind == "parquet" else ".jsonl"],
                                      [f], cache_dir, "data.image_text_files")
                self.num_malformed += malformed
                missing = {"image", "caption"} - set(ds.column_names)
                if missing:
                    raise InputError(f"data.image_text_files: {f} lacks field(s) {sorted(missing)}; "
                                     "each record needs 'image' and 'caption'")
                part = formats.TableFile(ds)
            self.parts.append(part)
            self.base_dirs.append(os.path.dirname(os.path.abspath(f)))
            sizes.append(len(part))
        self.offsets = np.cumsum([0] + sizes)
        n = int(self.offsets[-1])
        # O(n) once per host: about a second per 10^7 records.
        perm = np.random.default_rng(0).permutation(n)
        num_heldout = min(int(round(IMAGE_HOLDOUT_FRACTION * n)), eval_records)
        self.heldout, self.train = perm[:num_heldout], np.sort(perm[num_heldout:])
        if not len(self.train) or not len(self.heldout):
            raise InputError(f"data.image_text_files: {n} records in {', '.join(files)} cannot "
                             "fill both splits (20% is held out, at most data.eval_records); "
                             "add more")
        self.host_files = host_shards(len(files), process_index, process_count)
        part_of_train = np.searchsorted(self.offsets, self.train, side="right") - 1
        self.host_train = self.train[np.isin(part_of_train, self.host_files)]
        if not len(self.host_train):
            raise InputError(f"data.image_text_files: process {process_index} of {process_count} "
                             f"got files {[files[i] for i in self.host_files]} with no training "
                             "record; write more, evenly filled shards")

    def __len__(self):
        return int(self.offsets[-1])

    def all_captions(self, limit: int) -> list[str]:
        """Up to `limit` captions in file order (for tokenizer training)."""
        out = []
        for part in self.parts:
            for caps in part.captions():
                out += [caps] if isinstance(caps, str) else [c for c in caps or [] if isinstance(c, str)]
                if len(out) >= limit:
                    return out[:limit]
        return out

    def record(self, row: int, rng: np.random.Generator | None = None):
        """Row -> (image [S, S, C] float32, captions list[str], langs list[str], label int).

        `rng` draws the training crop of an encoded image (None: centre crop). Raises
        BadRecord (naming file, row and why) for an unreadable or missing image, an
        empty caption or other malformed fields.
        """
        part = int(np.searchsorted(self.offsets, row, side="right")) - 1
        index = int(row - self.offsets[part])
        try:
            return self._parse(self.parts[part].row(index), self.base_dirs[part], rng)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise BadRecord(f"{self.files[part]} record {index}: {type(e).__name__}: {e}") from e

    def _parse(self, rec, base_dir, rng):
        if rec["image"] is None:
            raise ValueError("no image")
        raw = rec["caption"]
        caps = [raw] if isinstance(raw, str) else list(raw or [])
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"caption {raw!r} is not a non-empty string or list of them")
        if max(len(c) for c in caps) > self.max_chars:
            raise ValueError(f"a caption is over data.max_text_chars={self.max_chars}")
        langs = rec.get("lang")
        if langs is None:
            langs = [captions.detect_lang(c) for c in caps]
        elif isinstance(langs, str):
            langs = [langs] * len(caps)
        if len(langs) != len(caps) or not set(langs) <= set(captions.LANGS):
            raise ValueError(f"lang {rec.get('lang')!r} does not match the captions")
        image = images.load_image(rec["image"], base_dir, self.image_size, self.channels, rng)
        label = rec.get("label")
        return image, caps, list(langs), -1 if label is None else int(label)


def host_shards(num_files: int, process_index: int, process_count: int) -> list[int]:
    """Indices of the files process `process_index` trains on: every `process_count`-th
    from its own index when there are enough files to go round, else all of them."""
    if process_count > 1 and num_files >= process_count:
        return list(range(process_index, num_files, process_count))
    return list(range(num_files))
