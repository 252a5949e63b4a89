"""Bad records are counted and skipped; a source with nothing valid is a clear error."""
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from m6jax.data import Pipeline
from m6jax.data.config import DEFAULTS

B = 16
WORDS = ("red", "green", "blue", "square", "circle", "notes", "about", "small", "large")


def _config(**overrides):
    return ml_collections.ConfigDict({"data": {**DEFAULTS, "vocab_size": 300, "text_len": 32,
                                               "max_text_chars": 200, **overrides}})


def _texts(tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 6)) + f" {i}" for i in range(600)]
    lines[10:10] = ["", "   ", "x" * 201]  # two empty and one over-long text
    (tmp_path / "notes.txt").write_text("\n".join(lines))
    return str(tmp_path / "notes.txt")


def _good_rows(tmp_path, n):
    rows = []
    for i in range(n):
        Image.fromarray(np.full((8, 8), 12 * i, np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": "a grey square"})
    return rows


BAD_ROWS = [
    {"image": "missing.png", "caption": "no such file"},           # unreadable: missing
    {"image": "garbage.png", "caption": "not an image"},           # unreadable: bad bytes
    {"image": "img0.png", "caption": ""},                          # empty caption
    {"image": "img0.png", "caption": "y" * 201},                   # over-long caption
    {"image": None, "caption": "no image"},                        # malformed: null image
    {"image": "img0.png", "caption": "a square", "lang": "fr"},    # malformed: unknown lang
]


def _pairs(tmp_path, rows):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _pipeline(tmp_path, image_text_files):
    config = _config(text_files=_texts(tmp_path), image_text_files=image_text_files,
                     task_weights={"caption": 1.0, "lm": 1.0})
    return Pipeline(config, seed=0, batch_size=B, workdir=str(tmp_path / "work"),
                    cache_dir=str(tmp_path / "cache"))


def test_bad_records_are_counted_and_skipped(tmp_path):
    rows = _good_rows(tmp_path, 20)
    rows[3:3] = BAD_ROWS
    pipe = _pipeline(tmp_path, _pairs(tmp_path, rows))
    assert pipe.text.num_empty == 2 and pipe.text.num_too_long == 1
    batches = [pipe.batch(step) for step in range(30)]
    for b in batches:  # every sampled image example is a good one
        assert np.isfinite(b["patches"]).all() and b["patches"].max() <= 1.0
    bad_rows = set(pipe.counters()["bad_image_rows"])
    assert bad_rows and bad_rows <= set(range(3, 3 + len(BAD_ROWS)))
    assert pipe.counters()["bad_records"] == 3 + len(bad_rows)
    # Skipping keeps data order a pure function of the step: a fresh pipeline agrees.
    again = _pipeline(tmp_path, _pairs(tmp_path, rows))
    for k in ("patches", "text_tokens"):
        np.testing.assert_array_equal(again.batch(29)[k], batches[29][k])


def test_all_bad_image_text_file_is_a_clear_error_naming_it(tmp_path):
    path = _pairs(tmp_path, BAD_ROWS * 3)
    pipe = _pipeline(tmp_path, path)
    with pytest.raises(ValueError, match=rf"no usable record in data.image_text_files={path}"):
        for step in range(5):
            pipe.batch(step)
    with pytest.raises(ValueError, match=rf"data.image_text_files={path}: no usable held-out"):
        pipe.caption_eval_set()


def test_text_file_without_valid_text_is_a_clear_error_naming_it(tmp_path):
    bad = tmp_path / "empty.txt"
    bad.write_text("\n\n" + "z" * 500 + "\n")
    config = _config(text_files=str(bad), image_text_files=_pairs(tmp_path, _good_rows(tmp_path, 5)))
    with pytest.raises(ValueError, match=rf"2 empty, 1 over data.max_text_chars=200\) from {bad}"):
        Pipeline(config, seed=0, batch_size=B, workdir=str(tmp_path / "w"),
                 cache_dir=str(tmp_path / "cache"))
