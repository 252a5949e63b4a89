"""`shards.json`: each shard's record count, so a host need not open a shard to size it.

`make_shards.py` (shards.write_shards) writes it beside the shards:
  {"shards": {"shard-00000.tar": {"records": 1000, "bytes": 1234567}, ...}}
The loader sizes every file of data.image_text_files from it (one read per folder, a
stat per file) and opens a shard only when a row of it is first drawn. A shard whose
size on disk differs from its entry (rewritten since) is opened and counted instead.
"""
import json
import os

NAME = "shards.json"
_CACHE: dict[str, dict] = {}  # folder -> its index ({} if none), read once per process


def write(out_dir: str, counts: dict[str, int]) -> str:
    """Records the shards named in `counts` (path -> records) in out_dir/shards.json,
    keeping entries of other shards already there."""
    path = os.path.join(out_dir, NAME)
    shards = _read(path)
    for p, n in counts.items():
        shards[os.path.basename(p)] = {"records": int(n), "bytes": os.path.getsize(p)}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"shards": dict(sorted(shards.items()))}, f, indent=1)
    os.replace(tmp, path)
    _CACHE.pop(os.path.abspath(out_dir), None)
    return path


def records(path: str) -> int | None:
    """The indexed record count of shard `path`, or None (no index or a stale entry)."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in _CACHE:
        _CACHE[folder] = _read(os.path.join(folder, NAME))
    entry = _CACHE[folder].get(os.path.basename(path))
    if entry is None or entry.get("bytes") != os.path.getsize(path):
        return None
    return int(entry["records"])


def forget() -> None:
    """Drops the indexes read so far (a benchmark or test that rewrites them)."""
    _CACHE.clear()


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f)["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
