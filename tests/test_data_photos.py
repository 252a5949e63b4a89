"""Real photos through every record format, the shard tool, bad records, per-host shards
and the worker loader (scikit-image's sample photographs, captions from photos.py)."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from m6jax.data import Pipeline, images, photos, shards, sources
from m6jax.data.config import DEFAULTS
from m6jax.data.loader import Loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, STEPS = 8, 3


def make_config(**overrides):
    return ml_collections.ConfigDict({"data": {
        **DEFAULTS, "vocab_size": 300, "text_len": 32, "image_size": 32, "patch_size": 8,
        "image_channels": 3, "task_weights": {"caption": 1.0, "lm": 0.3}, **overrides}})


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The 20 photos as a folder + captions.tsv, a jsonl of paths, webdataset shards (from
    the shard tool, as a user runs it), parquet shards of bytes, a text file, a tokenizer."""
    root = tmp_path_factory.mktemp("photos")
    captions = photos.photo_folder(str(root / "folder"))
    records = shards.read_captions(captions, str(root / "folder"))
    with open(root / "folder" / "records.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"image": os.path.basename(r["image"]), "caption": r["caption"]},
                               ensure_ascii=False) + "\n")
    tool = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "make_shards.py"),
                           f"--images={root / 'folder'}", f"--captions={captions}",
                           f"--out={root / 'wds'}", "--format=webdataset", "--per_shard=5"],
                          capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr
    assert "wrote 20 records in 4 shard(s)" in tool.stdout
    shards.write_shards(records, str(root / "pq"), "parquet", per_shard=5)
    caps = [en for en, _ in photos.CAPTIONS.values()]
    lines = [f"note {i}: {caps[i % len(caps)]}" for i in range(400)]
    (root / "text.txt").write_text("\n".join(lines), encoding="utf-8")
    kwargs = dict(seed=0, batch_size=B, workdir=str(root / "work"), cache_dir=str(root / "cache"))
    files = {"folder": captions, "jsonl": str(root / "folder" / "records.jsonl"),
             "webdataset": str(root / "wds" / "shard-*.tar"),
             "parquet": str(root / "pq" / "shard-*.parquet")}
    return root, files, kwargs


def pipeline(data, fmt="webdataset", **overrides):
    root, files, kwargs = data
    return Pipeline(make_config(image_text_files=files[fmt], text_files=str(root / "text.txt"),
                                **overrides), **kwargs)


def assert_equal_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- formats ---------------------------------------------------------------------------

def test_every_format_yields_identical_batches_for_the_same_records(data):
    reference = [pipeline(data, "folder").batch(s) for s in range(STEPS)]
    assert reference[0]["image_mask"].any()
    for fmt in ("jsonl", "webdataset", "parquet"):
        pipe = pipeline(data, fmt)
        for step in range(STEPS):
            assert_equal_batches(pipe.batch(step), reference[step])


def test_a_forced_format_reads_any_extension(data, tmp_path):
    _, files, _ = data
    renamed = tmp_path / "captions.txt"
    renamed.write_text(open(files["folder"], encoding="utf-8").read(), encoding="utf-8")
    with open(files["folder"], encoding="utf-8") as f:
        first = f.readline().split("\t")[0]
    os.symlink(os.path.join(os.path.dirname(files["folder"]), first), tmp_path / first)
    src = sources.ImageTextSource([str(renamed)], str(tmp_path), 32, 3, fmt="folder")
    assert len(src) == 20 and src.record(0)[1][0] == photos.CAPTIONS[first][0]


def test_training_crops_at_random_and_eval_at_the_centre(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :, 0] = np.arange(30, dtype=np.uint8)[None] * 8  # red ramp along the width
    Image.fromarray(wide).save(tmp_path / "wide.png")
    centre = images.decode(str(tmp_path / "wide.png"), 10, 3)
    np.testing.assert_array_equal(centre[0, :, 0] * 255, np.arange(10, 20) * 8)
    lefts = {int(round(images.decode(str(tmp_path / "wide.png"), 10, 3, np.random.default_rng(s))[0, 0, 0] * 255 / 8))
             for s in range(20)}
    assert len(lefts) > 5 and lefts <= set(range(21))


def test_rgb_is_normalised_with_imagenet_statistics_and_grey_is_not(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "white.png")
    rgb = images.load_image("white.png", str(tmp_path), 8, 3)
    np.testing.assert_allclose(rgb[0, 0], (1 - images.RGB_MEAN) / images.RGB_STD, rtol=1e-6)
    assert images.load_image("white.png", str(tmp_path), 8, 1).max() == 1.0


# ---- bad records -------------------------------------------------------------------------

def test_corrupt_jpeg_missing_file_and_empty_caption_are_counted_and_skipped_naming_the_file(data, tmp_path):
    root, files, kwargs = data
    records = shards.read_captions(files["folder"], str(root / "folder"))[:8]
    bad = [{"image": b"\xff\xd8\xff\xe0 not really a jpeg", "ext": ".jpg", "caption": "a broken photo"},
           {"image": records[0]["image"], "caption": ""}]
    tar = shards.write_shards(records[:6] + bad, str(tmp_path / "wds"), "webdataset", per_shard=100)[0]
    tsv = tmp_path / "more.tsv"
    tsv.write_text("no_such_photo.jpg\ta photo that is not there\n", encoding="utf-8")
    src = sources.ImageTextSource([tar, str(tsv)], str(tmp_path), 32, 3)
    for row, why in ((6, "OSError"), (7, "caption"), (8, "No such file")):
        with pytest.raises(sources.BadRecord) as e:
            src.record(row)
        assert why in str(e.value)
        assert (tar if row < 8 else str(tsv)) in str(e.value)
    pipe = Pipeline(make_config(image_text_files=f"{tar},{tsv}", text_files=str(root / "text.txt"),
                                task_weights={"caption": 1.0}), **{**kwargs, "batch_size": 32})
    batch = pipe.batch(0)
    assert batch["image_mask"].all()  # every row still got a good photo
    drawn_bad = pipe.bad_image_rows & {6, 7, 8}
    assert drawn_bad and pipe.counters()["bad_records"] == len(pipe.bad_image_rows)
    for row in drawn_bad:
        assert (tar if row < 8 else str(tsv)) in pipe.bad_messages[row]


# ---- per-host shards ---------------------------------------------------------------------

@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_hosts_train_on_disjoint_shards_that_cover_the_data(data, hosts):
    root, files, _ = data
    tars = sorted(str(p) for p in (root / "wds").glob("*.tar"))
    per_host = [sources.ImageTextSource(tars, str(root), 32, 3, process_index=i, process_count=hosts)
                for i in range(hosts)]
    rows = [set(s.host_train.tolist()) for s in per_host]
    assert set().union(*rows) == set(per_host[0].train.tolist())
    assert sum(map(len, rows)) == len(per_host[0].train)  # pairwise disjoint
    files_of = [set(s.host_files) for s in per_host]
    assert all(f == set(range(i, len(tars), hosts)) for i, f in enumerate(files_of))


def test_fewer_files_than_hosts_share_all_records(data):
    root, files, _ = data
    one = [sources.ImageTextSource([files["folder"]], str(root), 32, 3, process_index=i,
                                   process_count=2) for i in range(2)]
    np.testing.assert_array_equal(one[0].host_train, one[1].host_train)


# ---- the loader --------------------------------------------------------------------------

def test_workers_resumed_mid_run_give_bitwise_the_batches_of_an_uninterrupted_run(data):
    pipe = pipeline(data, pack=True)
    straight = list(Loader(pipe, 0, 6, num_workers=0))
    placed = []
    resumed = Loader(pipe, 3, 6, place=lambda step, b: placed.append(step) or b,
                     num_workers=2, prefetch=2)
    assert resumed.step == 3
    got = list(resumed)
    assert placed == [4, 5, 6]  # 1-based steps, as the loop's test hooks count them
    assert len(got) == 3 and resumed.step == 6
    for a, b in zip(got, straight[3:]):
        assert_equal_batches(a, b)
    assert "segment_ids" in got[0]


def test_lossless_webp_and_png_bytes_decode_to_the_same_pixels():
    import io
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
    encoded = {}
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **kw)
        encoded[fmt] = images.load_image(buf.getvalue(), "", 32, 3)
    np.testing.assert_array_equal(encoded["WEBP"], encoded["PNG"])
    assert encoded["PNG"].shape == (32, 32, 3)
