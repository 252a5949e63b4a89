"""Text-to-image as a user runs it (slow): train_vq.py, pretrain.py with m6_t2i.py,
generate.py --text; the trained tokenizer's reconstruction bound; bad input refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

pytestmark = pytest.mark.slow

SMALL = ["--config.model.emb_dim=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
         "--config.model.num_layers=2", "--config.batch_size=8", "--config.data.eval_examples=16",
         "--config.peak_tflops_per_device=1.0", "--config.optimizer.warmup_steps=1",
         "--config.t2i.eval_samples_per_digit=1", "--config.num_caption_samples=0"]


def _run(script, args, cache):
    env = dict(os.environ, XLA_FLAGS="", M6JAX_CACHE=str(cache))
    return subprocess.run([sys.executable, f"experiments/{script}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    vq_dir, t2i_dir = tmp_path_factory.mktemp("vq"), tmp_path_factory.mktemp("t2i")
    proc = _run("train_vq.py", ["--config=experiments/configs/vq.py:tiny",
                                "--config.total_steps=200", f"--workdir={vq_dir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("pretrain.py", ["--config=experiments/configs/m6_t2i.py:tiny", *SMALL,
                                "--config.total_steps=6", "--config.log_every=3",
                                f"--config.vq_from={vq_dir}", f"--workdir={t2i_dir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return vq_dir, t2i_dir, cache


def test_trained_tokenizer_reconstructs_held_out_digits(runs):
    from m6jax.vq.data import TokenizerImages
    from m6jax.vq.load import ImageTokenizer
    vq_dir, _, cache = runs
    tok = ImageTokenizer(str(vq_dir))
    images = TokenizerImages("", 32, 1, str(cache))
    held = images.batch(images.heldout[:200])
    codes = tok.encode(held)
    assert codes.shape == (200, 64) and codes.min() >= 0 and codes.max() < 64
    recon = tok.decode(codes)
    psnr = 10 * np.log10(1.0 / ((recon - held) ** 2).mean())
    # An untrained tokenizer gives ~8 dB, the mean image ~13 dB; 200 steps reach ~30 dB.
    assert psnr > 25, psnr
    summary = json.loads((vq_dir / "summary.json").read_text())
    assert summary["codebook_usage"] >= 0.8 and summary["vq_psnr"] > 25


def test_t2i_summary_has_the_numbers(runs):
    _, t2i_dir, _ = runs
    s = json.loads((t2i_dir / "summary.json").read_text())
    for k in ("t2i_accuracy", "t2i_accuracy_mask", "vq_psnr", "codebook_usage",
              "t2i_classifier_accuracy", "t2i_baseline_random_codes",
              "t2i_baseline_nearest_caption", "t2i_s_per_image", "t2i_s_per_image_mask"):
        assert np.isfinite(s[k]), k
    assert s["t2i_classifier_accuracy"] > 0.9  # the judge itself is good
    assert s["t2i_baseline_nearest_caption"] >= 0.8 and s["t2i_baseline_random_codes"] < 0.5
    assert (t2i_dir / "t2i_grid.png").exists() and (t2i_dir / "t2i_grid_mask.png").exists()


@pytest.mark.parametrize("strategy", ["sample", "mask"])
def test_generate_writes_a_grid_for_a_prompt(runs, tmp_path, strategy):
    _, t2i_dir, cache = runs
    out = tmp_path / "grid.png"
    proc = _run("generate.py", [f"--workdir={t2i_dir}", "--text=画一个数字七", f"--out={out}",
                                f"--strategy={strategy}", "--num_samples=4"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 images for '画一个数字七' (zh)" in proc.stdout
    assert Image.open(out).size == ((2 * 33 + 1) * 4,) * 2  # 2 x 2 grid of 32 px, scale 4


def test_pretrain_without_tokenizer_checkpoint_is_refused_in_one_line(tmp_path):
    proc = _run("pretrain.py", ["--config=experiments/configs/m6_t2i.py:tiny",
                                f"--workdir={tmp_path}"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "vq_from=''" in lines[0] and "train_vq.py" in lines[0], proc.stderr


def test_pretraining_from_stored_codes_equals_encoding_at_start_up(runs, tmp_path):
    """encode_codes.py once, then the fixture's run reading those codes: bitwise the same
    losses and t2i_accuracy as encoding every image at start-up (the fixture's run), so
    the full-length figure (BENCHMARKS "Data at scale") carries over."""
    vq_dir, t2i_dir, cache = runs
    codes, workdir = tmp_path / "codes", tmp_path / "from_codes"
    proc = _run("encode_codes.py", [f"--vq_from={vq_dir}", f"--out={codes}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("pretrain.py", ["--config=experiments/configs/m6_t2i.py:tiny", *SMALL,
                                "--config.total_steps=6", "--config.log_every=3",
                                f"--config.vq_from={vq_dir}", f"--config.data.codes_dir={codes}",
                                f"--workdir={workdir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [[json.loads(l)["loss"] for l in open(d / "metrics.jsonl") if '"loss"' in l]
              for d in (workdir, t2i_dir)]
    assert losses[0] and losses[0] == losses[1]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (workdir, t2i_dir)]
    assert summaries[0]["t2i_accuracy"] == summaries[1]["t2i_accuracy"]
