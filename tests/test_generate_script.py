"""experiments/generate.py as a user runs it, on a workdir the real pretrain entry point wrote.

The trained-workdir tests are `slow`: the tiny pretraining run alone takes ~60 s here
(compiling init, train step, eval and the caption decoder); each generate call ~10 s.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

PRETRAIN_ARGS = [
    "--config=experiments/configs/m6.py:tiny", "--config.total_steps=4", "--config.log_every=2",
    "--config.eval_every=100", "--config.batch_size=8", "--config.mesh.data=1",
    "--config.model.emb_dim=32", "--config.model.mlp_dim=64", "--config.model.num_layers=2",
    "--config.data.vocab_size=300", "--config.data.eval_examples=16",
    "--config.optimizer.warmup_steps=2", "--config.num_caption_samples=1",
]


def _run(script, args, cache_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               M6JAX_CACHE=str(cache_dir))
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_missing_checkpoint_says_to_pretrain_first(tmp_path):
    proc = _run("experiments/generate.py", [f"--workdir={tmp_path}"], tmp_path / "cache")
    assert proc.returncode != 0
    assert "no checkpoint in" in proc.stderr
    assert "python experiments/pretrain.py --config=experiments/configs/m6.py:tiny" in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir, cache = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    proc = _run("experiments/pretrain.py", [*PRETRAIN_ARGS, f"--workdir={workdir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, cache


def _generate(trained, *args):
    workdir, cache = trained
    proc = _run("experiments/generate.py", [f"--workdir={workdir}", *args], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_captions_held_out_digits_with_their_labels(trained):
    lines = _generate(trained, "--num_digits=3", "--lang=zh")
    assert lines[0].startswith("step 4 of ")
    assert len(lines) == 4 and all(line.startswith("digit ") for line in lines[1:])


@pytest.mark.slow
def test_captions_an_image_file_with_beam_search(trained, tmp_path):
    from PIL import Image
    image = np.zeros((20, 20), np.uint8)
    image[4:16, 9:11] = 255                   # a "1", white on black, not 8x8
    Image.fromarray(image).save(tmp_path / "one.png")
    lines = _generate(trained, f"--image={tmp_path / 'one.png'}", "--strategy=beam",
                      "--beam_size=3")
    assert len(lines) == 2 and lines[1].startswith("one.png: ")


@pytest.mark.slow
def test_continues_a_prompt_by_sampling_reproducibly(trained):
    args = ("--prompt=今天", "--strategy=sample", "--top_p=0.9", "--num_samples=2",
            "--max_new=6", "--seed=3")
    lines = _generate(trained, *args)
    assert len(lines) == 3 and all(line.startswith("今天|") for line in lines[1:])
    assert _generate(trained, *args) == lines
