"""Specification of the m6jax.data batch contract, data order, splits and sources."""
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from m6jax.data import Pipeline, captions, corpora, images, tasks, validate_data_config
from m6jax.data.config import DEFAULTS

B = 16


def make_config(**overrides):
    return ml_collections.ConfigDict({"data": {**DEFAULTS, "vocab_size": 300, "text_len": 32, **overrides}})


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A cache with the shipped corpora, a 3k-line text subset and a trained tokenizer."""
    root = tmp_path_factory.mktemp("data")
    text_files, _ = corpora.shipped_corpora(str(root / "cache"))
    subset = root / "subset.jsonl"
    with open(subset, "w", encoding="utf-8") as out:
        for path in text_files:
            with open(path, encoding="utf-8") as f:
                for _, line in zip(range(1500), f):
                    out.write(line)
    config = make_config(text_files=str(subset))
    kwargs = dict(workdir=str(root / "work"), cache_dir=str(root / "cache"))
    return config, kwargs, Pipeline(config, seed=0, batch_size=B, **kwargs)


@pytest.fixture
def pipe(env):
    return env[2]


def assert_equal_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- config validation -------------------------------------------------------------

def test_unknown_task_names_the_field():
    with pytest.raises(ValueError, match=r"data.task_weights has unknown task 'captoin'; known: caption, "
                                         r"caption_denoise, denoise, lm"):
        validate_data_config(make_config(task_weights={"captoin": 1.0}))


@pytest.mark.parametrize("weights, field", [({"lm": -1.0, "caption": 1.0}, "data.task_weights.lm"),
                                            ({"lm": 0.0}, "data.task_weights")])
def test_negative_or_all_zero_weights_name_the_field(weights, field):
    with pytest.raises(ValueError, match=field):
        validate_data_config(make_config(task_weights=weights))


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match=r"data.patch_size=3 does not divide data.image_size=8"):
        validate_data_config(make_config(patch_size=3))


@pytest.mark.parametrize("overrides, field", [({"text_len": 4}, "data.text_len"),
                                              ({"image_channels": 2}, "data.image_channels"),
                                              ({"noise_density": 1.5}, "data.noise_density"),
                                              ({"text_length": 64}, "data.text_length")])
def test_bad_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        validate_data_config(make_config(**overrides))


def test_validate_accepts_the_data_section_alone():
    validate_data_config(make_config().data)


# ---- batch layout ------------------------------------------------------------------

def test_batch_shapes_and_dtypes(pipe):
    b = pipe.batch(0)
    t, p = pipe.text_len, pipe.num_patches
    expected = {"patches": (np.float32, (B, p, 4)), "image_mask": (np.bool_, (B, p)),
                "text_tokens": (np.int32, (B, t)), "text_mask": (np.bool_, (B, t)),
                "text_is_prefix": (np.bool_, (B, t)), "targets": (np.int32, (B, t)),
                "loss_mask": (np.float32, (B, t)), "task_id": (np.int32, (B,))}
    assert {k: (v.dtype.type, v.shape) for k, v in b.items()} == expected
    assert (pipe.num_patches, pipe.patch_dim) == (16, 4)


def test_targets_are_inputs_shifted_by_one_and_end_in_eos(pipe):
    b = pipe.batch(1)
    for i in range(B):
        n = b["text_mask"][i].sum()
        assert b["text_mask"][i, :n].all() and not b["text_mask"][i, n:].any()
        np.testing.assert_array_equal(b["targets"][i, :n - 1], b["text_tokens"][i, 1:n])
        assert b["targets"][i, n - 1] == pipe.tokenizer.eos_id
        assert not b["text_tokens"][i, n:].any() and not b["targets"][i, n:].any()


def test_loss_covers_exactly_target_and_eos_after_prefix(pipe):
    b = pipe.batch(2)
    for i in range(B):
        n, prefix_len = b["text_mask"][i].sum(), b["text_is_prefix"][i].sum()
        assert b["text_is_prefix"][i, :prefix_len].all() and 1 <= prefix_len < n
        expected = np.zeros(pipe.text_len, np.float32)
        expected[prefix_len - 1:n] = 1.0
        np.testing.assert_array_equal(b["loss_mask"][i], expected)


def test_prefix_starts_with_task_and_language_tokens(pipe):
    b, tok = pipe.batch(3), pipe.tokenizer
    first = {0: tok.caption_id, 1: tok.denoise_id, 2: tok.denoise_id, 3: tok.lm_id}
    for i in range(B):
        task = b["task_id"][i]
        assert b["text_tokens"][i, 0] == first[task]
        if task in tasks.IMAGE_TASKS:
            assert b["text_tokens"][i, 1] in (tok.zh_id, tok.en_id)
        if task == tasks.CAPTION:
            assert b["text_is_prefix"][i].sum() == 2


def test_only_image_tasks_carry_patches(pipe):
    b = pipe.batch(4)
    has_image = np.isin(b["task_id"], tasks.IMAGE_TASKS)
    np.testing.assert_array_equal(b["image_mask"].all(1), has_image)
    assert not b["image_mask"][~has_image].any() and not b["patches"][~has_image].any()
    assert 0.0 <= b["patches"].min() and b["patches"].max() <= 1.0


def test_pack_hand_example():
    out = tasks.pack([4, 8], [20, 21], eos_id=3, text_len=6)
    np.testing.assert_array_equal(out["text_tokens"], [4, 8, 20, 21, 0, 0])
    np.testing.assert_array_equal(out["targets"], [8, 20, 21, 3, 0, 0])
    np.testing.assert_array_equal(out["text_is_prefix"], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"], [0, 1, 1, 1, 0, 0])


def test_corruption_replaces_each_span_with_one_mask():
    rng = np.random.default_rng(0)
    tokens = list(range(100, 140))  # 40 tokens: 6 noise tokens in 2 spans
    out = tasks.corrupt_spans(tokens, mask_id=7, noise_density=0.15, mean_span=3.0, rng=rng)
    assert out.count(7) == 2 and len(out) == 40 - 6 + 2
    kept = [t for t in out if t != 7]
    assert kept == [t for t in tokens if t in kept]  # an ordered subsequence


def test_patchify_is_row_major_over_the_patch_grid():
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    np.testing.assert_array_equal(images.patchify(image, 2),
                                  [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])


# ---- data order --------------------------------------------------------------------

def test_same_arguments_give_identical_batches(env):
    config, kwargs, pipe = env
    again = Pipeline(config, seed=0, batch_size=B, **kwargs)
    assert_equal_batches(pipe.batch(5), again.batch(5))


def test_process_index_and_seed_change_the_batch(env):
    config, kwargs, pipe = env
    other_host = Pipeline(config, seed=0, batch_size=2 * B, process_index=1, process_count=2, **kwargs)
    other_seed = Pipeline(config, seed=1, batch_size=B, **kwargs)
    assert other_host.batch_size == B
    assert not np.array_equal(pipe.batch(5)["text_tokens"], other_host.batch(5)["text_tokens"])
    assert not np.array_equal(pipe.batch(5)["text_tokens"], other_seed.batch(5)["text_tokens"])


def test_eval_batches_are_fixed_full_and_mixed(pipe):
    first, second = pipe.eval_batches(), pipe.eval_batches()
    for a, b in zip(first, second):
        assert_equal_batches(a, b)
    task_ids = np.concatenate([b["task_id"] for b in first])
    real = np.concatenate([b["loss_mask"].any(1) for b in first])
    half = DEFAULTS["eval_examples"] // 2  # the 3k-line subset has fewer held-out texts
    assert (task_ids[real] == tasks.CAPTION).sum() == half
    assert (task_ids[real] == tasks.LM).sum() == min(half, len(pipe.text.heldout))
    assert len(task_ids) % B == 0
    langs = np.concatenate([b["text_tokens"][:, 1] for b in first])[task_ids == tasks.CAPTION]
    assert {pipe.tokenizer.zh_id, pipe.tokenizer.en_id} == set(langs)


# ---- splits and captions -----------------------------------------------------------

def test_splits_are_disjoint_and_seed_free(pipe):
    assert not set(pipe.images.train) & set(pipe.images.heldout)
    assert len(pipe.images.heldout) == round(0.2 * 1797)
    assert not set(pipe.text.train) & set(pipe.text.heldout)
    assert 0.005 < len(pipe.text.heldout) / len(pipe.text.dataset) < 0.05


def test_caption_eval_set_is_the_heldout_digits(pipe):
    patches, image_mask, labels = pipe.caption_eval_set()
    assert patches.shape == (359, 16, 4) and image_mask.all() and set(labels) == set(range(10))
    assert pipe.caption_prompt("en") == [pipe.tokenizer.caption_id, pipe.tokenizer.en_id]


@pytest.mark.parametrize("text, lang, expected", [
    ("a handwritten digit seven", "en", 7), ("The number ONE.", "en", 1),
    ("someone wrote a seven", "en", 7), ("someone", "en", None),
    ("a two or a three", "en", None), ("seven seven", "en", 7), ("图中的数字是九", "zh", 9),
    ("这是数字", "zh", None), ("一二", "zh", None), ("seven", "zh", None)])
def test_caption_class_parses_exactly_one_class_word(text, lang, expected):
    assert Pipeline.caption_class(text, lang) == expected


def test_templates_name_only_their_own_class():
    for label in range(10):
        for caption, lang in zip(*captions.digit_captions(label)):
            assert captions.caption_class(caption, lang) == label


def test_shipped_text_keeps_sentiment_labels_and_strips_tags(env):
    _, kwargs, _ = env
    text_files, _ = corpora.shipped_corpora(kwargs["cache_dir"])
    with open(text_files[0], encoding="utf-8") as f:
        labels = {json.loads(line)["label"] for line in f}
    with open(text_files[1], encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    assert labels == {0, 1}
    assert first.startswith("迈向充满希望的新世纪") and "/" not in first and " " not in first


# ---- user files --------------------------------------------------------------------

def test_user_image_paths_and_txt_load_through_the_same_path(env, tmp_path):
    _, kwargs, pipe = env
    rows = []
    for i in range(10):  # 12x12 RGB files, resized to 8x8 grey by the loader
        Image.fromarray(np.full((12, 12, 3), 25 * i, np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": "a grey square" if i % 2 else "一个灰色方块"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    notes = [f"line {i} of my own notes" for i in range(200)]
    (tmp_path / "notes.txt").write_text("\n".join(notes[:100] + ["", "  "] + notes[100:]))
    config = make_config(text_files=str(tmp_path / "*.txt"), image_text_files=str(tmp_path / "pairs.jsonl"),
                         task_weights={"caption": 1.0, "lm": 1.0})
    user = Pipeline(config, seed=0, batch_size=B, workdir=kwargs["workdir"], cache_dir=str(tmp_path / "c"))
    b = user.batch(0)
    decoded = {user.tokenizer.decode(t[m > 0]) for t, m in zip(b["targets"], b["loss_mask"])}
    assert decoded <= {"a grey square", "一个灰色方块"} | {f"line {i} of my own notes" for i in range(200)}
    assert b["patches"][b["image_mask"]].max() <= 1.0
    assert user.text.num_empty == 2  # blank lines are counted, never sampled
    patches, _, labels = user.caption_eval_set()
    assert patches.shape == (2, 16, 4) and (labels == -1).all()


def test_missing_user_file_names_the_field(env, tmp_path):
    _, kwargs, _ = env
    with pytest.raises(ValueError, match="data.text_files"):
        Pipeline(make_config(text_files=str(tmp_path / "none*.txt")), seed=0, batch_size=B, **kwargs)
