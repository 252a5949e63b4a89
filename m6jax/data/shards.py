"""Writing image-caption shards: webdataset tars and parquet files with image bytes, or
the preprocessed format (decoded pixels, m6jax/data/preprocessed.py).

Encoded image bytes are copied as they are (no re-encoding, so a shard decodes exactly
like the folder it came from); captions go in `KEY.json` ({"caption": [...], "lang":
[...]} when known) or the parquet columns `caption`/`lang`. Files are written under a
temporary name and renamed, so a reader never sees half a shard; `shards.json` then
records each shard's size (m6jax/data/shard_index.py).
"""
import io
import json
import os
import tarfile

from m6jax.data import formats, preprocessed, shard_index
from m6jax.errors import InputError

SHARD_FORMATS = ("webdataset", "parquet", "preprocessed")
EXTS = {"webdataset": "tar", "parquet": "parquet", "preprocessed": "npy"}


def read_captions(path: str, images_dir: str) -> list[dict]:
    """A captions file -> records {image: absolute path, caption: [..]}.

    `.tsv`: `image<TAB>caption[<TAB>caption...]` a line; `.jsonl`: objects with `image`
    and `caption` (optional `lang`, `label`). Image paths are relative to `images_dir`.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                rec = json.loads(line)
            else:
                image, *caps = line.rstrip("\n").split("\t")
                rec = {"image": image.strip(), "caption": caps}
            rec["image"] = os.path.join(images_dir, rec["image"])
            records.append(rec)
    if not records:
        raise InputError(f"--captions={path} has no record")
    return records


def write_shards(records: list[dict], out_dir: str, fmt: str, per_shard: int = 1000,
                 prefix: str = "shard", image_size: int = 224, channels: int = 3,
                 crop_margin: int = 0) -> list[str]:
    """Writes `records` ({image: path | bytes, caption, optional lang/label}) as shards of
    `per_shard` records: `prefix-00000.tar`, `.parquet` or `.npy` (preprocessed: images
    of (image_size + crop_margin) px a side, `channels` channels). Returns the paths."""
    if fmt not in SHARD_FORMATS:
        raise InputError(f"--format={fmt!r} is not one of {', '.join(SHARD_FORMATS)}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(records), per_shard)):
        chunk = records[start:start + per_shard]
        path = os.path.join(out_dir, f"{prefix}-{n:05d}.{EXTS[fmt]}")
        tmp = f"{path}.tmp{os.getpid()}"
        if fmt == "preprocessed":
            preprocessed.write(chunk, tmp, image_size, channels, crop_margin,
                               lambda r: io.BytesIO(_image_bytes(r)[0]), _meta)
            os.replace(tmp + preprocessed.META_SUFFIX, path + preprocessed.META_SUFFIX)
        else:
            (_write_tar if fmt == "webdataset" else _write_parquet)(chunk, tmp, start)
        os.replace(tmp, path)
        paths.append(path)
    shard_index.write(out_dir, {p: min(per_shard, len(records) - i * per_shard)
                                for i, p in enumerate(paths)})
    return paths


def _image_bytes(rec) -> tuple[bytes, str]:
    image = rec["image"]
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), rec.get("ext", ".jpg")
    ext = os.path.splitext(image)[1].lower()
    with open(image, "rb") as f:
        return f.read(), ext if ext in formats.IMAGE_EXTS else ".jpg"


def _meta(rec) -> dict:
    # Lists throughout, so one parquet column type fits records of one or many captions.
    caps = rec["caption"]
    out = {"caption": [caps] if isinstance(caps, str) else list(caps)}
    lang = rec.get("lang")
    if lang is not None:
        out["lang"] = [lang] * len(out["caption"]) if isinstance(lang, str) else list(lang)
    if rec.get("label") is not None:
        out["label"] = int(rec["label"])
    return out


def _write_tar(chunk, path, first):
    with tarfile.open(path, "w") as tf:
        for i, rec in enumerate(chunk, first):
            data, ext = _image_bytes(rec)
            key = f"{i:09d}"
            for name, payload in ((key + ext, data),
                                  (key + ".json", json.dumps(_meta(rec), ensure_ascii=False).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def _write_parquet(chunk, path, first):
    import pyarrow as pa
    import pyarrow.parquet as pq
    metas = [_meta(r) for r in chunk]
    columns = {"image": pa.array([_image_bytes(r)[0] for r in chunk], pa.binary()),
               "caption": [m["caption"] for m in metas]}
    for k in ("lang", "label"):
        if all(k in m for m in metas):
            columns[k] = [m[k] for m in metas]
    pq.write_table(pa.table(columns), path)
