# %% [markdown]
# # Text-to-image with M6: image codes, autoregressive and parallel decoding
#
# M6's two-stage image generation on the shipped digits: a VQ-VAE turns each image into
# 8 x 8 = 64 discrete codes, and M6 learns caption -> codes (the codes are appended to
# the text vocabulary). Codes are then decoded autoregressively with the KV cache, or
# MaskGIT-style in a few parallel steps, and turned back into pixels by the VQ-VAE.
# This notebook: train both stages small, look at reconstructions, draw every digit from
# Chinese and English prompts, and compare the two decoders.
#
# Source: `notebooks/text_to_image.py` (percent format); `python notebooks/build.py`
# writes the `.ipynb`.

# %%
# Set-up: in Colab, clone the repository and install m6jax from it; locally, make this
# clone importable. The experiment configs live in experiments/configs (not in the
# installed package), which is why Colab gets a clone rather than only a pip install.
import os
import subprocess
import sys

REPO = "https://github.com/m6jax/m6jax"  # edit: your fork
EXTRA = ""  # Colab GPU runtime: "cuda12"; TPU runtime: "tpu"; CPU: ""

if "google.colab" in sys.modules:
    ROOT = "/content/m6jax"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth=1", REPO, ROOT], check=True)
    # the same as pip install "m6jax[EXTRA] @ git+REPO", from the clone
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    f"{ROOT}[{EXTRA}]" if EXTRA else ROOT], check=True)
else:
    # a local clone: this notebook sits in ROOT/notebooks (M6JAX_ROOT overrides)
    ROOT = os.environ.get("M6JAX_ROOT") or os.path.dirname(os.path.abspath(os.getcwd()))
    if not os.path.isdir(os.path.join(ROOT, "m6jax")):
        raise RuntimeError(f"no m6jax/ in {ROOT}: open the notebook from notebooks/ of a "
                           "clone or set M6JAX_ROOT to the clone")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))

import jax
from absl import logging

logging.set_verbosity(logging.WARNING)  # training's info lines would flood the output
print("backend:", jax.default_backend(), "| devices:", jax.devices())

# %% tags=["parameters"]
VQ_STEPS = 400  # tokenizer steps (vq.py:tiny: ~1 minute here)
T2I_STEPS = 600  # M6 steps (m6_t2i.py:tiny: a few minutes on 2 cores)
SAMPLES_PER_DIGIT = 16  # for t2i_accuracy at the end of pretraining
OVERRIDES = {}  # flattened config overrides of the M6 run, e.g. {"model.num_layers": 2}
TOKENIZER = ""  # '' = train the text tokenizer in WORKDIR
WORKDIR = ""  # '' = a fresh temporary directory

# %%
import json
import tempfile
import warnings

import matplotlib.pyplot as plt
import numpy as np
# %matplotlib inline

warnings.filterwarnings("ignore", message="Glyph .* missing")  # CJK titles, no CJK font
WORKDIR = WORKDIR or tempfile.mkdtemp(prefix="m6jax_t2i_")
VQ_DIR, T2I_DIR = os.path.join(WORKDIR, "vq"), os.path.join(WORKDIR, "t2i")


def show(images, rows, title=""):
    """images f32 [N, S, S, 1] as a rows x (N / rows) grid."""
    cols = -(-len(images) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, images):
        ax.imshow(im[..., 0], cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title)
    plt.show()

# %% [markdown]
# ## Stage 1: the image tokenizer (VQ-VAE, EMA codebook)

# %%
import vq as vq_configs
from m6jax.vq.train import train as train_vq

vq_config = vq_configs.get_config("tiny")
vq_config.total_steps = VQ_STEPS
vq_config.optimizer.warmup_steps = min(50, VQ_STEPS // 5)
vq_summary = train_vq(vq_config, VQ_DIR)
print({k: round(v, 3) for k, v in vq_summary.items() if isinstance(v, float)})

# %%
# Held-out digits (top) and their reconstructions from 64 codes each (bottom).
from PIL import Image
pairs = np.asarray(Image.open(os.path.join(VQ_DIR, "reconstructions.png")), np.float32) / 255
plt.figure(figsize=(12, 2))
plt.imshow(pairs, cmap="gray")
plt.axis("off")
plt.title(f"reconstructions: PSNR {vq_summary['vq_psnr']:.1f} dB, "
          f"codebook usage {vq_summary['codebook_usage']:.0%}")
plt.show()

# %% [markdown]
# ## Stage 2: M6 learns caption -> codes
# `text_to_image` (next-code prediction) and `text_to_image_mask` (masked codes, for
# parallel decoding) mixed with captioning by `data.task_weights`; 10% of captions are
# dropped for classifier-free guidance. The end of training evaluates both decoders.

# %%
import m6_t2i
from m6jax.train.loop import train

config = m6_t2i.get_config("tiny")
config.vq_from = VQ_DIR
config.total_steps = T2I_STEPS
config.log_every = max(1, T2I_STEPS // 6)
config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, T2I_STEPS // 5)
config.num_caption_samples = 0
config.t2i.eval_samples_per_digit = SAMPLES_PER_DIGIT
if TOKENIZER:
    config.data.tokenizer_path = TOKENIZER
config.update_from_flattened_dict(OVERRIDES)
summary = train(config, T2I_DIR)
for k in ("t2i_accuracy", "t2i_accuracy_mask", "t2i_classifier_accuracy",
          "t2i_baseline_random_codes", "t2i_baseline_nearest_caption", "vq_psnr", "codebook_usage"):
    print(f"{k:30s} {summary[k]:.3f}")

# %% [markdown]
# ## Every digit, asked in Chinese and in English

# %%
from m6jax.data.captions import CLASS_WORDS
from m6jax.t2i.cli import draw, load_t2i_run

run = load_t2i_run(T2I_DIR)
per = 4
for lang, template in (("zh", "画一个数字{}"), ("en", "draw the digit {}")):
    texts = [template.format(CLASS_WORDS[lang][d]) for d in range(10) for _ in range(per)]
    _, images, _ = draw(run, texts, "sample", seed=1)
    # one column per digit
    order = np.arange(len(texts)).reshape(10, per).T.reshape(-1)
    show(images[order], per, f"{lang}: {template.format('…')} (autoregressive, 0-9 left to right)")

# %% [markdown]
# ## Autoregressive (64 cached steps) vs parallel (MaskGIT, 8 steps)

# %%
texts = ["画一个数字七"] * 8 + ["draw the digit three"] * 8
rows = []
for strategy in ("sample", "mask"):
    _, images, seconds = draw(run, texts, strategy, seed=2)
    rows.append(images)
    print(f"{strategy:6s}: {seconds / len(texts) * 1000:.1f} ms per image")
show(np.concatenate(rows), 4, "top two rows: autoregressive; bottom two: parallel")
print("summary:", json.dumps({k: round(summary[k], 4) for k in summary if k.startswith("t2i_s_per")}))
