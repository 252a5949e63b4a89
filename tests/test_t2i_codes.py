"""Text-to-image codes made once (experiments/encode_codes.py) and read by the pipeline:
the stored codes are the tokenizer's, and no VQ encode runs at start-up."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from m6jax.data import photos, shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An (untrained, randomly initialised) tiny image tokenizer checkpoint, and the 20
    photos as 4 webdataset shards."""
    from configs import vq as vq_config
    from m6jax import checkpoint
    from m6jax.vq.train import init_state, make_optimizer
    root = tmp_path_factory.mktemp("codes")
    c = vq_config.get_config("tiny")
    c.vq.codebook_size = 64  # the tiny t2i config's
    state = init_state(c, make_optimizer(c))
    ckpt = checkpoint.Checkpointer(str(root / "vq"), c)
    ckpt.save(1, state, dict(config=checkpoint.config_json(c), data=dict(step=1)), force=True)
    ckpt.wait()
    ckpt.close()
    captions = photos.photo_folder(str(root / "folder"))
    records = shards.read_captions(captions, str(root / "folder"))
    shards.write_shards(records, str(root / "wds"), "webdataset", per_shard=5)
    return root, str(root / "vq"), str(root / "wds" / "shard-*.tar")


def encode(root, vq, files, out, index, count):
    env = dict(os.environ, XLA_FLAGS="", M6JAX_CACHE=str(root / "cache"))
    return subprocess.run([sys.executable, "experiments/encode_codes.py", f"--vq_from={vq}",
                           f"--out={out}", f"--image_text_files={files}",
                           f"--process_index={index}", f"--process_count={count}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def codes_dir(setup):
    root, vq, files = setup
    out = root / "codes"
    for i in range(2):  # two processes share the four shards
        proc = encode(root, vq, files, out, i, 2)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"process {i}/2: 2 file(s) of codes (64 a record)" in proc.stdout
    return str(out)


def test_stored_codes_are_the_tokenizers_codes_of_each_record(setup, codes_dir):
    from m6jax.vq.data import TokenizerImages
    from m6jax.vq.load import ImageTokenizer
    root, vq, files = setup
    tok = ImageTokenizer(vq)
    images = TokenizerImages(files, tok.image_size, tok.channels, str(root / "cache"))
    expected = tok.encode(images.batch(np.arange(20)))  # what start-up encoding computes
    stored = np.concatenate([np.load(os.path.join(codes_dir, f"shard-{i:05d}.tar.codes.npy"))
                             for i in range(4)])
    np.testing.assert_array_equal(stored, expected)
    assert sorted(os.listdir(codes_dir)) == ["codes.json"] + [
        f"shard-{i:05d}.tar.codes.npy" for i in range(4)]


def t2i_pipeline(root, vq, files, codes=""):
    from configs import m6_t2i

    from m6jax.data import Pipeline
    c = m6_t2i.get_config("tiny")
    c.vq_from = vq
    c.data.update(image_text_files=files, codes_dir=codes, vocab_size=320)
    return Pipeline(c.data, seed=0, batch_size=8, workdir=str(root / "work"),
                    cache_dir=str(root / "cache"))


def test_a_run_with_codes_dir_never_runs_the_encoder_and_trains_on_the_stored_codes(
        setup, codes_dir, monkeypatch):
    from m6jax.vq import load
    root, vq, files = setup
    reference = t2i_pipeline(root, vq, files)  # encodes at start-up
    batches = [reference.batch(s) for s in range(3)]

    def refuse(*args, **kwargs):
        raise AssertionError("the VQ encoder ran")
    monkeypatch.setattr(load.ImageTokenizer, "encode", refuse)
    monkeypatch.setattr("m6jax.vq.data.TokenizerImages.__init__", refuse)
    with pytest.raises(AssertionError, match="encoder ran"):
        t2i_pipeline(root, vq, files)  # the patch bites: start-up encoding is refused
    pipe = t2i_pipeline(root, vq, files, codes_dir)
    assert (pipe.batch(0)["task_id"] >= 4).any()  # text-to-image rows drawn
    for s in range(3):
        b = pipe.batch(s)
        for k in b:
            np.testing.assert_array_equal(b[k], batches[s][k], err_msg=k)


def test_codes_of_another_tokenizer_are_refused_naming_the_field(setup, codes_dir, tmp_path):
    import json

    from m6jax.errors import InputError
    root, vq, files = setup
    bad = tmp_path / "codes"
    bad.mkdir()
    for f in os.listdir(codes_dir):
        os.link(os.path.join(codes_dir, f), bad / f)
    (bad / "codes.json").unlink()
    (bad / "codes.json").write_text(json.dumps(dict(vq_from=vq, num_codes=16, codebook_size=64)))
    with pytest.raises(InputError, match="data.codes_dir=.*holds codes of 16 per image"):
        t2i_pipeline(root, vq, files, str(bad))

