"""Data at scale (issue 29): the preprocessed pixel format, shards sized from shards.json
and opened only when first read, the bounded held-out set."""
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from m6jax.data import Pipeline, images, photos, shard_index, shards, sources
from m6jax.data.config import DEFAULTS
from m6jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, B = 32, 8


def make_config(**overrides):
    return ml_collections.ConfigDict({"data": {
        **DEFAULTS, "vocab_size": 300, "text_len": 32, "image_size": SIZE, "patch_size": 8,
        "image_channels": 3, "task_weights": {"caption": 1.0}, **overrides}})


@pytest.fixture(scope="module")
def photo_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    captions = photos.photo_folder(str(root / "folder"))
    return root, captions, shards.read_captions(captions, str(root / "folder"))


def make_shards_tool(root, captions, fmt, out, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "make_shards.py"),
                           f"--images={os.path.dirname(captions)}", f"--captions={captions}",
                           f"--out={out}", f"--format={fmt}", "--per_shard=5", *extra],
                          capture_output=True, text=True, timeout=300)


# ---- the preprocessed format -------------------------------------------------------

def test_make_shards_writes_the_preprocessed_format_as_a_user_runs_it(photo_records):
    root, captions, _ = photo_records
    tool = make_shards_tool(root, captions, "preprocessed", root / "pre",
                            f"--image_size={SIZE}", "--channels=3")
    assert tool.returncode == 0, tool.stderr
    assert "wrote 20 records in 4 shard(s)" in tool.stdout and "shard-*.npy" in tool.stdout
    pixels = np.load(root / "pre" / "shard-00000.npy")
    assert pixels.dtype == np.uint8 and pixels.shape == (5, SIZE, SIZE, 3)
    assert shard_index.records(str(root / "pre" / "shard-00003.npy")) == 5


def test_preprocessed_pixels_are_the_decoded_images(photo_records):
    """Stored pixels = Pillow's decode (JPEG at libjpeg's reduced scale, `draft`), shorter
    side resized to SIZE, centre square: the JPEG path's evaluation crop, worked here
    with Pillow directly."""
    from PIL import Image
    root, _, records = photo_records
    shards.write_shards(records, str(root / "pre_ref"), "preprocessed", per_shard=20,
                        image_size=SIZE, channels=3)
    pixels = np.load(root / "pre_ref" / "shard-00000.npy")
    for i in (0, 3, 7):  # astronaut (square), rocket, a motorcycle (both not square)
        with Image.open(records[i]["image"]) as im:
            im.draft("RGB", (SIZE, SIZE))
            im = im.convert("RGB")
            w, h = im.size
            s = SIZE / min(w, h)
            size = (max(SIZE, round(w * s)), max(SIZE, round(h * s)))
            im = im.resize(size, Image.BILINEAR) if size != (w, h) else im
            x0, y0 = (size[0] - SIZE) // 2, (size[1] - SIZE) // 2
            expected = np.asarray(im.crop((x0, y0, x0 + SIZE, y0 + SIZE)))
        np.testing.assert_array_equal(pixels[i], expected)


def test_preprocessed_eval_images_equal_the_jpeg_paths_bitwise(photo_records):
    root, _, records = photo_records
    shards.write_shards(records, str(root / "wds_eq"), "webdataset", per_shard=5)
    shards.write_shards(records, str(root / "pre_eq"), "preprocessed", per_shard=5,
                        image_size=SIZE, channels=3)
    a = sources.ImageTextSource(sorted(map(str, (root / "wds_eq").glob("*.tar"))), str(root), SIZE, 3)
    b = sources.ImageTextSource(sorted(map(str, (root / "pre_eq").glob("*.npy"))), str(root), SIZE, 3)
    for row in range(20):
        ra, rb = a.record(row), b.record(row)
        np.testing.assert_array_equal(ra[0], rb[0])
        assert ra[1:] == rb[1:]


def test_preprocessed_training_crop_is_a_random_window_of_the_stored_pixels(photo_records):
    root, _, records = photo_records
    margin = 8
    shards.write_shards(records[:5], str(root / "pre_m"), "preprocessed", per_shard=5,
                        image_size=SIZE, channels=3, crop_margin=margin)
    stored = np.load(root / "pre_m" / "shard-00000.npy")[1]
    src = sources.ImageTextSource([str(root / "pre_m" / "shard-00000.npy")], str(root), SIZE, 3)
    windows = {(y, x): images.normalise(stored[y:y + SIZE, x:x + SIZE] / np.float32(255))
               for y in range(margin + 1) for x in range(margin + 1)}
    seen = set()
    for seed in range(12):
        got = src.record(1, np.random.default_rng(seed))[0]
        match = [k for k, w in windows.items() if np.array_equal(w, got)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 3  # the offsets vary with the rng
    np.testing.assert_array_equal(src.record(1)[0], windows[(margin // 2, margin // 2)])


def test_normalise_equals_the_imagenet_formula():
    x = np.random.default_rng(0).random((SIZE, SIZE, 3), np.float32)
    expected = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
        [0.229, 0.224, 0.225], np.float32)
    np.testing.assert_array_equal(images.normalise(x), expected)


def test_preprocessed_images_smaller_than_the_config_are_refused_naming_the_field(photo_records):
    root, _, records = photo_records
    shards.write_shards(records, str(root / "pre_small"), "preprocessed", per_shard=20,
                        image_size=16, channels=3)
    pipe = Pipeline(make_config(image_text_files=str(root / "pre_small" / "shard-*.npy"),
                                text_files=_text_file(root)),
                    seed=0, batch_size=B, workdir=str(root / "work_small"), cache_dir=str(root / "c"))
    with pytest.raises(InputError, match=f"data.image_size={SIZE}"):
        pipe.batch(0)


def _text_file(root):
    path = root / "text.txt"
    if not path.exists():
        caps = [en for en, _ in photos.CAPTIONS.values()]
        path.write_text("\n".join(f"note {i}: {caps[i % 20]}" for i in range(400)), encoding="utf-8")
    return str(path)


# ---- shards opened lazily ----------------------------------------------------------

@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, photo_records):
    """40 tar shards of 2 records, each caption naming its shard; a trained tokenizer."""
    root = tmp_path_factory.mktemp("many")
    _, _, records = photo_records
    recs = [dict(image=records[i % 20]["image"], caption=[f"photo from shard {i // 2}"], lang="en")
            for i in range(80)]
    paths = shards.write_shards(recs, str(root / "tars"), "webdataset", per_shard=2)
    config = make_config(image_text_files=str(root / "tars" / "shard-*.tar"),
                         text_files=_text_file(root))
    kwargs = dict(seed=0, batch_size=2 * B, workdir=str(root / "work"), cache_dir=str(root / "c"))
    Pipeline(config, **kwargs)  # trains the tokenizer (reading captions from the shards)
    return root, paths, config, kwargs


class OpenCounter:
    """Files opened by Python (`open` audit events, which tarfile's and numpy's opens
    raise too): an independent count of what the loader reads."""
    active, paths = False, []

    @classmethod
    def hook(cls, event, args):
        if cls.active and event == "open" and isinstance(args[0], str):
            cls.paths.append(os.path.abspath(args[0]))


sys.addaudithook(OpenCounter.hook)


def opened_during(fn):
    OpenCounter.paths, OpenCounter.active = [], True
    try:
        out = fn()
    finally:
        OpenCounter.active = False
    return out, list(OpenCounter.paths)


def test_a_host_opens_only_the_shards_its_first_batch_reads(many_shards):
    root, paths, config, kwargs = many_shards
    shard_index.forget()

    def first_batch():
        pipe = Pipeline(config, process_index=1, process_count=2, **kwargs)
        return pipe, pipe.batch(0)
    (pipe, batch), opened = opened_during(first_batch)
    tars = {p for p in opened if p.endswith(".tar")}
    # Which shards the batch's rows came from, read off their captions.
    drawn = set()
    for targets, mask in zip(batch["targets"], batch["loss_mask"]):
        text = pipe.tokenizer.decode([int(t) for t, m in zip(targets, mask) if m and t != 3])
        drawn.add(paths[int(text.split()[-1])])
    assert tars == drawn  # distinct shard files opened = the shards the batch read
    assert tars <= {paths[i] for i in range(1, 40, 2)}  # only this host's shards
    assert len(tars) < 20  # not every file of the host


def test_without_shards_json_every_shard_is_opened_at_startup(many_shards, tmp_path):
    root, paths, config, kwargs = many_shards
    for p in paths[:6]:
        os.link(p, tmp_path / os.path.basename(p))
    files = sorted(str(p) for p in tmp_path.glob("*.tar"))
    _, opened = opened_during(lambda: sources.ImageTextSource(files, str(root), SIZE, 3))
    assert {p for p in opened if p.endswith(".tar")} == set(files)


def test_startup_over_1000_indexed_shards_opens_none_and_takes_under_a_second(tmp_path):
    names = [f"shard-{i:05d}.tar" for i in range(1000)]
    for n in names:
        (tmp_path / n).write_bytes(b"x" * 10)  # never opened: sizes come from the index
    shard_index.write(str(tmp_path), {str(tmp_path / n): 3 for n in names})
    shard_index.forget()
    import time
    t0 = time.perf_counter()
    src, opened = opened_during(lambda: sources.ImageTextSource(
        [str(tmp_path / n) for n in names], str(tmp_path), SIZE, 3, process_index=3,
        process_count=8))
    assert time.perf_counter() - t0 < 1.0
    assert [p for p in opened if p.endswith(".tar")] == []
    assert len(src) == 3000 and len(src.heldout) == 600 and len(src.host_files) == 125


def test_a_lazy_shard_pickles_unopened(many_shards):
    _, paths, _, _ = many_shards
    src = sources.ImageTextSource(paths[:4], os.path.dirname(paths[0]), SIZE, 3)
    src.record(0)
    sent = pickle.loads(pickle.dumps(src.parts[0]))
    assert sent.path == paths[0] and sent._part is None
    assert sent.row(0)["caption"] == src.parts[0].row(0)["caption"]


def test_a_stale_index_entry_opens_the_shard(many_shards, tmp_path):
    root, paths, _, _ = many_shards
    copy = tmp_path / "shard-00000.tar"
    copy.write_bytes(open(paths[0], "rb").read())
    shard_index.write(str(tmp_path), {str(copy): 2})
    with open(copy, "ab") as f:
        f.write(b"\0" * 1024)  # rewritten since: the entry's byte count no longer matches
    shard_index.forget()
    assert shard_index.records(str(copy)) is None


# ---- the bounded held-out set --------------------------------------------------------

def test_heldout_is_the_first_eval_records_of_the_seed0_permutation(many_shards):
    _, paths, _, _ = many_shards
    src = sources.ImageTextSource(paths, os.path.dirname(paths[0]), SIZE, 3, eval_records=5)
    np.testing.assert_array_equal(src.heldout, np.random.default_rng(0).permutation(80)[:5])
    assert len(src.train) == 75 and not set(src.train) & set(src.heldout)
    big = sources.ImageTextSource(paths, os.path.dirname(paths[0]), SIZE, 3, eval_records=1000)
    assert len(big.heldout) == 16  # 20% when that is fewer


# ---- packing and text-to-image -----------------------------------------------------------

def test_packing_text_to_image_is_refused_in_one_line_naming_the_field():
    from m6jax.data.config import data_settings
    c = make_config(pack=True, task_weights={"caption": 1.0, "text_to_image": 0.5})
    with pytest.raises(ValueError, match=r"^data.pack=True cannot pack "
                       r"data.task_weights.text_to_image examples[^\n]*data.pack=False$"):
        data_settings(c)
    data_settings(make_config(pack=True))  # text tasks alone still pack


# ---- the held-out set, streamed ----------------------------------------------------------

def test_caption_eval_batches_decode_one_chunk_at_a_time(many_shards):
    root, paths, config, kwargs = many_shards
    pipe = Pipeline(config, **kwargs)
    decoded = []
    record = pipe._image_record
    pipe._image_record = lambda row, rng=None: decoded.append(row) or record(row, rng)
    chunks = pipe.caption_eval_batches(3)
    first = next(chunks)
    assert len(decoded) == 3 and first[0].shape == (3, (SIZE // 8) ** 2, 8 * 8 * 3)
    rest = list(chunks)
    assert [len(c[2]) for c in rest] == [3, 3, 3, 3, 1]  # 16 held out
    whole = pipe.caption_eval_set()
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([c[k] for c in [first] + rest]), whole[k])
    assert pipe.heldout_captions() == [r for c in [first] + rest for r in c[3]]


# ---- the loader's workers: a bounded queue -------------------------------------------------

class CountingPipe:
    """A pipeline stub whose batches log their step (picklable: Grain's workers get it)."""
    settings = {"num_workers": 1, "prefetch": 1}

    def __init__(self, log):
        self.log, self.bad_image_rows, self.num_skipped, self.bad_messages = log, set(), 0, {}

    def batch(self, step):
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"{step}\n")
        return {"x": np.full((4, 4), step, np.float32)}


@pytest.mark.slow  # ~30 s here: a spawned worker imports jax
def test_a_worker_builds_at_most_prefetch_batches_ahead(tmp_path):
    import time

    from m6jax.data.loader import DEVICE_PREFETCH, Loader
    log = tmp_path / "built.txt"
    loader = Loader(CountingPipe(str(log)), 0, 300, num_workers=1, prefetch=1)
    try:
        assert next(loader)["x"][0, 0] == 0
        time.sleep(3)  # ample time to run ahead: a batch takes microseconds
        built = len(log.read_text().split())
    finally:
        loader.close()
    # The one read + the device queue + the prefetch thread's one in hand + the worker's
    # buffer + the one it builds, and Grain's hand-offs between them (a few): 8 measured
    # here; all 300 with Grain's default read options (16 threads, 500 buffered).
    assert built <= 1 + DEVICE_PREFETCH + 1 + 1 + 1 + 6, built
