"""The `config.data` fields the data package reads, their defaults and validation.

`validate_data_config` is cheap (files are globbed and stat-ed, not read) so the entry
points call it before compiling anything; every error names the field or file to fix.
"""
import glob
import os
from typing import Any

from m6jax import schema
from m6jax.errors import InputError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
IMAGE_TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".tar", ".tsv", ".npy")
IMAGE_TEXT_FORMATS = ("", "jsonl", "parquet", "webdataset", "folder", "preprocessed")

TASK_NAMES = ("caption", "caption_denoise", "denoise", "lm", "text_to_image", "text_to_image_mask")

# The data section's fields, their defaults and meanings live in m6jax/schema.py (DATA).
DEFAULTS = {k: default for k, (default, _) in schema.DATA.items()}

# The shortest text_len that leaves room for [task, lang] + a 1-token source and a
# 1-token target in a denoising example, with some slack for real text.
MIN_TEXT_LEN = 8
# 4 special + 6 task/lang ids + 256 byte-fallback pieces, plus a few learnt pieces.
MIN_VOCAB_SIZE = 300


def _as_dict(value) -> dict:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def data_settings(config) -> dict[str, Any]:
    """Returns the validated data fields as a plain dict, defaults filled in.

    `config` is either the whole experiment config (with a `data` field) or its data
    section; missing fields take the defaults above, unknown ones are an error (a typo
    such as `data.text_length` must not silently fall back to a default).
    """
    data = _as_dict(config.data if "data" in config else config)
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"data.{unknown[0]} is not a data field; known: {', '.join(DEFAULTS)}")
    settings = {**DEFAULTS, **data}
    settings["task_weights"] = _as_dict(settings["task_weights"])
    _check(settings)
    return settings


def validate_data_config(config) -> None:
    """Raises ValueError naming the offending `data.*` field or file if the config is
    unusable: bad values, a glob that matches nothing, a missing or empty file."""
    s = data_settings(config)
    if s["text_files"]:
        expand_globs(s["text_files"], "data.text_files", TEXT_SUFFIXES)
    if s["image_text_files"]:
        expand_globs(s["image_text_files"], "data.image_text_files", image_text_suffixes(s))


def image_text_suffixes(settings: dict) -> tuple[str, ...] | None:
    """Allowed extensions of data.image_text_files: any (None) when the format is forced."""
    return None if settings["image_text_format"] else IMAGE_TEXT_SUFFIXES


def expand_globs(spec: str, field: str, allowed: tuple[str, ...] | None) -> list[str]:
    """Comma-separated globs -> sorted file list; refuses (naming `field` and the file) a
    pattern that matches nothing, another suffix, a directory or an empty file."""
    files = []
    for pattern in filter(None, (p.strip() for p in spec.split(","))):
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise InputError(f"{field}: pattern {pattern!r} matches no file; check the path "
                             "(comma-separated globs, ~ allowed)")
        files += matches
    for f in files:
        if allowed is not None and os.path.splitext(f)[1] not in allowed:
            raise InputError(f"{field}: {f!r} is not one of {', '.join(allowed)}")
        if not os.path.isfile(f):
            raise InputError(f"{field}: {f!r} is not a file")
        if os.path.getsize(f) == 0:
            raise InputError(f"{field}: {f!r} is empty; remove it from the list or fill it")
    return files


def task_probabilities(task_weights: dict) -> list[float]:
    """Normalised sampling probabilities in TASK_NAMES order; missing tasks weigh 0."""
    for name in task_weights:
        if name not in TASK_NAMES:
            raise ValueError(f"data.task_weights has unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    weights = [float(task_weights.get(name, 0.0)) for name in TASK_NAMES]
    for name, w in zip(TASK_NAMES, weights):
        if not w >= 0:  # also catches NaN
            raise ValueError(f"data.task_weights.{name}={w} must be >= 0")
    if sum(weights) <= 0:
        raise ValueError("data.task_weights are all zero; give at least one task a positive weight")
    return [w / sum(weights) for w in weights]


def _check(s: dict) -> None:
    for field in ("text_len", "image_size", "image_channels", "patch_size", "vocab_size", "eval_examples",
                  "max_text_chars", "prefetch", "eval_records"):
        if not isinstance(s[field], int) or isinstance(s[field], bool) or s[field] <= 0:
            raise ValueError(f"data.{field}={s[field]!r} must be a positive integer")
    if s["text_len"] < MIN_TEXT_LEN:
        raise ValueError(f"data.text_len={s['text_len']} is too small; use at least {MIN_TEXT_LEN}")
    if s["image_size"] % s["patch_size"]:
        raise ValueError(f"data.patch_size={s['patch_size']} does not divide data.image_size={s['image_size']}")
    if s["image_channels"] not in (1, 3):
        raise ValueError(f"data.image_channels={s['image_channels']} must be 1 (grey) or 3 (RGB)")
    if s["vocab_size"] < MIN_VOCAB_SIZE:
        raise ValueError(f"data.vocab_size={s['vocab_size']} is too small; use at least {MIN_VOCAB_SIZE}")
    if not 0 < s["noise_density"] < 1:
        raise ValueError(f"data.noise_density={s['noise_density']} must be in (0, 1)")
    if not s["mean_span"] >= 1:
        raise ValueError(f"data.mean_span={s['mean_span']} must be >= 1")
    if not 0.0 <= s["caption_dropout"] < 1.0:
        raise ValueError(f"data.caption_dropout={s['caption_dropout']} must be in [0, 1)")
    for field in ("tokenizer_path", "text_files", "image_text_files", "vq_from", "codes_dir"):
        if not isinstance(s[field], str):
            raise ValueError(f"data.{field}={s[field]!r} must be a string ('' for the default)")
    if s["image_text_format"] not in IMAGE_TEXT_FORMATS:
        raise ValueError(f"data.image_text_format={s['image_text_format']!r} is not one of "
                         f"{', '.join(repr(f) for f in IMAGE_TEXT_FORMATS)} ('' = by extension)")
    if not isinstance(s["pack"], bool):
        raise ValueError(f"data.pack={s['pack']!r} must be True or False")
    if not isinstance(s["num_workers"], int) or isinstance(s["num_workers"], bool) or s["num_workers"] < 0:
        raise ValueError(f"data.num_workers={s['num_workers']!r} must be an integer >= 0")
    task_probabilities(s["task_weights"])
    t2i = [t for t in ("text_to_image", "text_to_image_mask") if s["task_weights"].get(t, 0) > 0]
    if s["pack"] and t2i:
        # A text-to-image example is a prompt + every code of its image: it fills the row
        # alone, so packing has nothing to add to it (and packing.py lays out text only).
        raise ValueError(f"data.pack=True cannot pack data.task_weights.{t2i[0]} examples (an "
                         "image's codes fill the row); set data.pack=False")
