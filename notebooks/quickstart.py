# %% [markdown]
# # M6 quickstart: train the tiny M6, plot its losses, caption held-out digits
#
# M6 (Lin et al. 2021) is one transformer over `[image patches | text]`: attention masks
# make it an encoder (image patches and the text prefix see each other) and a decoder
# (target text sees the prefix and earlier targets) at once. The tiny config
# (`experiments/configs/m6.py:tiny`) trains on scikit-learn's 8x8 handwritten digits, each
# cut into 16 patches of 2x2 pixels, with Chinese and English captions ("手写数字七",
# "the number seven"), plus Chinese reviews and news for the text-only tasks. The four
# tasks, mixed in every batch: `caption`, `caption_denoise`, `denoise`, `lm`.
#
# This notebook trains it (briefly by default), plots the training losses and shows
# held-out digits with the captions the model generates for them.

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

# %% [markdown]
# ## Parameters
#
# Small defaults that run on a laptop CPU in a minute or two. For a real run set
# `STEPS = 1000` and `OVERRIDES = {}` (the README's quickstart: 93.5% caption accuracy);
# on a GPU add `"model.dtype": "bfloat16"`.

# %% tags=["parameters"]
STEPS = 60          # training steps; 1000 for the README's quickstart numbers
LOG_EVERY = 20      # a metrics.jsonl line (and a progress line) every N steps
OVERRIDES = {"batch_size": 16, "model.num_layers": 2}  # config fields, dotted; {} = tiny as is
TOKENIZER = ""      # path of a tokenizer.model to reuse; "" = train one into WORKDIR
WORKDIR = ""        # "" = a fresh temporary directory (m6jax_quickstart_*)
NUM_IMAGES = 12     # held-out digits to show

# %%
import json
import warnings

import numpy as np
import matplotlib.pyplot as plt
# %matplotlib inline

warnings.filterwarnings("ignore", message="Glyph .* missing")  # CJK text, no CJK font
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets


if not WORKDIR:  # made here, so an injected WORKDIR leaves no empty temp directory
    import tempfile
    WORKDIR = tempfile.mkdtemp(prefix="m6jax_quickstart_")


def configure(config):
    """The parameters cell's values applied to a config from experiments/configs."""
    config.total_steps = STEPS
    config.log_every = LOG_EVERY
    config.eval_every = max(1, STEPS // 3)  # two mid-run held-out evals (eval.jsonl)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, STEPS // 5)
    config.num_caption_samples = 0  # the notebook shows captions itself
    if TOKENIZER:
        config.data.tokenizer_path = TOKENIZER
    config.update_from_flattened_dict(OVERRIDES)
    return config


def read_metrics(workdir, name="metrics.jsonl"):
    """metrics.jsonl (or eval.jsonl) as {key: np.array over logged steps} (nan where a key
    is absent)."""
    with open(os.path.join(workdir, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    keys = sorted({k for r in rows for k in r})
    return {k: np.array([r.get(k, np.nan) for r in rows], float) for k in keys}


def smoothed(steps, values, weight=0.8):
    """(steps, exponential moving average) over the points where `values` exists: a task
    absent from a logged step's batch leaves no gap, and one step's noise is damped."""
    ok = np.isfinite(values)
    out, avg = [], None
    for v in values[ok]:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return steps[ok], np.array(out)


def load_trained(config, workdir, stage="real", step=None, pipe=None):
    """(params, mesh, state_shardings, pipeline) of a run's final (or `step`) checkpoint
    (`stage`: "real", or "pseudo" for a Pseudo-to-Real checkpoint before the switch)."""
    from m6jax import checkpoint, sharding
    from m6jax.data import Pipeline
    from m6jax.train import stages
    from m6jax.train.state import abstract_train_state, dummy_batch
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    pipe = pipe or Pipeline(config.data, seed=config.seed, batch_size=config.batch_size,
                            workdir=workdir)
    example = dummy_batch(config.batch_size, pipe.num_patches, pipe.patch_dim, pipe.text_len)
    model, tx = stages.model_and_optimizer(config, stage)
    abstract, shardings = abstract_train_state(model, tx, example, mesh, config.seed)
    path = os.path.join(workdir, "checkpoints", str(step)) if step is not None else workdir
    return checkpoint.load_params(path, abstract.params), mesh, shardings, pipe


# %% [markdown]
# ## Train
#
# `m6jax.train.loop.train(config, workdir)` is what `experiments/pretrain.py` runs: it
# writes `metrics.jsonl` (one line per logged step), `summary.json`, TensorBoard events
# and a final checkpoint, and returns the summary.

# %%
import m6 as m6_configs
from m6jax.train.loop import train

config = configure(m6_configs.get_config("tiny"))
summary = train(config, WORKDIR)
print(f"{summary['num_params']:,} parameters | eval loss {summary['initial_eval_loss']:.3f} -> "
      f"{summary['eval_loss']:.3f} | train {summary['train_s']:.0f} s | workdir {WORKDIR}")

# %% [markdown]
# ## Loss curves
#
# `loss` is the step's text cross-entropy over all target tokens; `loss/<task>` the same
# over one task's tokens. One step's loss is noisy (its batch mixes tasks at random), so
# the curves are exponential moving averages over the logged steps, each task's over the
# steps whose batch had it; the red points are the held-out eval loss (`eval.jsonl`).
# Captioning is the easiest task (a few dozen distinct captions); `lm` and `denoise` on
# Chinese prose stay far higher.

# %%
m, ev = read_metrics(WORKDIR), read_metrics(WORKDIR, "eval.jsonl")
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(*smoothed(m["step"], m["loss"]), "k-", lw=2, label="train loss (all tasks, smoothed)")
for key in [k for k in m if k.startswith("loss/")]:
    ax.plot(*smoothed(m["step"], m[key]), "--", label=f"train {key}")
ax.plot(ev["step"], ev["eval_loss"], "ro-", ms=5, label="held-out eval loss")
ax.set_xlabel("step")
ax.set_ylabel("loss (nats / token)")
ax.legend(fontsize=8)
ax.set_title("tiny M6 loss (exponential moving average, weight 0.8)")
plt.show()

# %% [markdown]
# ## Captions for held-out digits
#
# The 20% held-out images (a fixed split, independent of the seed) get greedy captions
# from the prompt `<caption> <en>` or `<caption> <zh>`: the model sees the image patches
# and the prompt, and decodes until end-of-sequence. `caption_eval_set()` gives the
# patches; `images.patchify` cut each image row-major into 2x2 blocks, which `unpatchify`
# below undoes for display. After a short run the captions are often empty or wrong:
# raise `STEPS`.

# %%
import textwrap

from m6jax.train import stages
from m6jax.train.evaluation import across_classes

params, mesh, shardings, pipe = load_trained(config, WORKDIR)
evaluator = stages.Stage(config, "real", mesh, shardings, pipe, list(pipe.task_names)).evaluator
patches, image_mask, labels = pipe.caption_eval_set()
shown_rows = across_classes(labels, NUM_IMAGES)  # one digit of each class in turn
patches, image_mask, labels = patches[shown_rows], image_mask[shown_rows], labels[shown_rows]
n = len(labels)
captions = {lang: evaluator.captions(params, patches[:n], image_mask[:n], lang)
            for lang in ("en", "zh")}


def unpatchify(p, patch_size, channels=1):
    """[P, patch_size**2 * C] patches (row-major grid) -> [S, S, C] image."""
    grid = int(round(np.sqrt(p.shape[0])))
    blocks = p.reshape(grid, grid, patch_size, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(grid * patch_size, grid * patch_size, channels)


cols = 6
fig, axes = plt.subplots(-(-n // cols), cols, figsize=(2.3 * cols, 2.9 * -(-n // cols)),
                         squeeze=False)
for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < n:
        ax.imshow(unpatchify(patches[i], pipe.patch_size)[..., 0], cmap="gray_r")
        short = textwrap.shorten(captions["en"][i], 40, placeholder="...")
        ax.set_title(f"label {labels[i]}\n" + "\n".join(textwrap.wrap(repr(short), 24)), fontsize=8)
plt.tight_layout()
plt.show()
for i in range(n):  # Chinese here: plot fonts often lack CJK glyphs
    print(f"digit {labels[i]}: en {captions['en'][i]!r} | zh {captions['zh'][i]!r}")

# %% [markdown]
# ## Caption accuracy
#
# A caption is right when it names exactly the true digit (in its language). The training
# loop measures it on all held-out digits, both languages (`summary.json`).

# %%
shown = np.mean([pipe.caption_class(captions[lang][i], lang) == labels[i]
                 for lang in ("en", "zh") for i in range(n)])
print(f"caption accuracy, all held-out digits: {summary['caption_accuracy']:.1%} "
      f"(en {summary['caption_accuracy_en']:.1%}, zh {summary['caption_accuracy_zh']:.1%}); "
      f"on the {n} shown: {shown:.1%}")
