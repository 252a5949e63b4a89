"""What a researcher meets on the first day: short runs, small corpora, own photos, the
notices that say what the run does with them, and strict summary files."""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from m6jax import cli
from m6jax.config_checks import clamp_warmup
from m6jax.data import describe
from m6jax.data import tokenizer as tokenizer_lib
from m6jax.train.evaluation import across_classes, char_f1
from m6jax.train.loop import _strict
from m6jax.train.metrics import MetricsWriter

SETTINGS = dict(image_size=8, image_channels=1, patch_size=2)


def _config(total_steps, warmup):
    return ml_collections.ConfigDict(dict(total_steps=total_steps,
                                          optimizer=dict(warmup_steps=warmup)))


def test_a_short_run_clamps_its_warmup_with_a_notice():
    c = _config(50, 50)
    notice = clamp_warmup(c)
    assert c.optimizer.warmup_steps == 5
    assert "optimizer.warmup_steps=50 clamped to 5" in notice
    c = _config(1000, 50)
    assert clamp_warmup(c) is None and c.optimizer.warmup_steps == 50


def test_a_small_corpus_caps_the_vocabulary_instead_of_failing(tmp_path):
    texts = ["今天天气很好我们去公园", "this is a small corpus", "数字七八九"] * 20
    path = str(tmp_path / "tok.model")
    tok = tokenizer_lib.load_or_train(path, 2000, lambda: texts, lambda: ["the number one"])
    assert tokenizer_lib.NUM_RESERVED < tok.vocab_size < 2000
    assert tok.decode(tok.encode("今天天气很好")) == "今天天气很好"
    assert tok.decode([tok.vocab_size + 5, tok.eos_id]) == ""  # a model row above its pieces
    # Reloading for the same request works; another vocab_size is still refused.
    assert tokenizer_lib.load_or_train(path, 2000, list, list).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="data.vocab_size=3000"):
        tokenizer_lib.load_or_train(path, 3000, list, list)


def test_the_image_notice_says_what_photos_become(tmp_path):
    Image.new("RGB", (179, 149), (200, 30, 30)).save(tmp_path / "a.jpg")
    channels, hw = describe.source_image_info("a.jpg", str(tmp_path))
    assert (channels, hw) == (3, (149, 179))
    line, warning = describe.image_notice(channels, hw, SETTINGS)
    assert line == "images: RGB 149x179 -> 1 channel, resized to 8x8, 16 patches of 2x2"
    assert "colour" in warning and "resolution" in warning
    digits = describe.source_image_info(np.zeros((8, 8)).tolist())
    assert describe.image_notice(*digits, SETTINGS)[1] is None
    rgb32 = dict(SETTINGS, image_channels=3, image_size=32, patch_size=4)
    assert describe.image_notice(3, (32, 32), rgb32) == (
        "images: RGB 32x32 -> 3 channels, resized to 32x32, 64 patches of 4x4", None)


def test_shown_examples_cover_the_classes_first():
    labels = np.array([6, 6, 6, 2, 6, 1, 2])
    assert [labels[i] for i in across_classes(labels, 4)] == [6, 2, 1, 6]


def test_caption_overlap_is_a_character_f1():
    assert char_f1("一只猫", "一只猫") == 1.0
    assert char_f1("", "一只猫") == 0.0
    assert char_f1("一只狗", "一只猫") == pytest.approx(2 / 3)


def test_summary_values_are_strict_json():
    out = json.dumps(_strict({"a": float("nan"), "b": [1.0, float("inf")], "c": 2}),
                     allow_nan=False)
    assert json.loads(out) == {"a": None, "b": [1.0, None], "c": 2}


def test_evaluations_go_to_eval_jsonl_and_survive_a_resume(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    w.write(0, {"eval_loss": 7.0}, jsonl=False)
    w.write(10, {"loss": 5.0})
    w.write(20, {"eval_loss": 5.5}, jsonl=False)
    w.close()
    w = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=10)  # resumed at step 10
    w.close()
    rows = [json.loads(l) for l in open(tmp_path / "eval.jsonl", encoding="utf-8")]
    assert rows == [{"step": 0, "eval_loss": 7.0}]
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [10]


def test_third_party_info_lines_are_filtered_ours_kept():
    import logging
    own = logging.LogRecord("absl", logging.INFO, os.path.join(cli._OWN_CODE[0], "x.py"), 1,
                            "ours", None, None)
    orbax = logging.LogRecord("absl", logging.INFO, "/site-packages/orbax/c.py", 1, "theirs",
                              None, None)
    warn = logging.LogRecord("absl", logging.WARNING, "/site-packages/orbax/c.py", 1, "w",
                             None, None)
    f = cli._OwnInfo()
    assert f.filter(own) and not f.filter(orbax) and f.filter(warn)
    assert cli.config_line(["x", "--config=a.py:tiny", "--config.total_steps=5"]) == \
        "config: a.py:tiny with total_steps=5"
