# %% [markdown]
# # M6-MoE: expert load during training and routing by modality
#
# `experiments/configs/m6_moe.py:tiny` is the tiny M6 with a Mixture-of-Experts
# feed-forward layer in every second block: 8 experts, Switch top-1 routing, capacity
# factor 1.25 (a choice over an expert's capacity is dropped: the residual carries the
# token), a load-balancing loss (weight 0.01) and a router z-loss. This notebook trains it,
# plots what the training loop logs about expert load, then runs the trained model on
# held-out image+text batches and shows how image-patch tokens and text tokens spread over
# the experts.

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
# For a real run: `STEPS = 1000`, `OVERRIDES = {}` (the README: caption accuracy 90.7%,
# final load max/mean 1.38). `OVERRIDES` may change routing, e.g.
# `{"model.moe.router": "prototype", "model.moe.k": 2}` (M6-T's expert prototyping) or
# `{"model.moe.aux_loss_weight": 0.0}` (no balancing loss).

# %% tags=["parameters"]
STEPS = 60
LOG_EVERY = 10
OVERRIDES = {"batch_size": 16}   # config fields, dotted; {} = m6_moe.py:tiny as is
TOKENIZER = ""                   # a tokenizer.model to reuse; "" = train one into WORKDIR
WORKDIR = ""        # "" = a fresh temporary directory (m6jax_moe_*)
EVAL_BATCHES = 4                 # held-out batches for the routing analysis

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
    WORKDIR = tempfile.mkdtemp(prefix="m6jax_moe_")


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

# %%
import m6_moe
from m6jax.train.loop import train

config = configure(m6_moe.get_config("tiny"))
summary = train(config, WORKDIR)
print(f"{summary['num_params']:,} parameters | eval loss {summary['eval_loss']:.3f} | "
      f"caption accuracy {summary['caption_accuracy']:.1%} | final load max/mean "
      f"{summary['expert_load_max_over_mean']:.2f} | dropped {summary['dropped_fraction']:.1%}")

# %% [markdown]
# ## Expert load over training
#
# Per logged step `metrics.jsonl` holds (`m6jax/train/moe_metrics.py`):
# `moe/load_max_over_mean` (the busiest expert's share of routing choices over the mean
# share, worst MoE layer; 1 = perfectly balanced), `moe/dropped_fraction` (choices over
# capacity, worst layer), `moe/router_entropy`, `moe/balance_loss` (1 when uniform),
# `moe/z_loss` and `moe/aux_loss`. Per-expert loads of every layer go to TensorBoard as
# histograms (`moe/load_over_mean/layerN`); the per-expert picture below comes from the
# trained model instead.

# %%
m = read_metrics(WORKDIR)
panels = [("moe/load_max_over_mean", "busiest expert / mean load"),
          ("moe/dropped_fraction", "dropped fraction of choices"),
          ("moe/router_entropy", "router entropy (nats)"),
          ("moe/balance_loss", "balance loss (1 = uniform)")]
fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
for ax, (key, title) in zip(axes, panels):
    ax.plot(m["step"], m[key], "o-", ms=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
axes[0].axhline(1.0, color="gray", ls=":", lw=1)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Routing by modality
#
# The MoE layer sows, besides the load metrics, `expert_index` [B, S, K]: the experts each
# token chose (before capacity). Applying the model with `mutable=["intermediates"]`
# returns them stacked over MoE layers, `[L_moe, B, P + T, K]`, over the sequence
# `[P image patches | T text tokens]`. Counting image-patch tokens (where `image_mask`)
# and text tokens (where `text_mask`) per expert shows whether the router has learned to
# separate the modalities. The held-out batches mix captioning examples (16 patches +
# caption text) and text-only `lm` examples.

# %%
import flax.linen as nn
from m6jax import sharding
from m6jax.train import evaluation, stages

params, mesh, shardings, pipe = load_trained(config, WORKDIR)
model = stages.build_model(config)  # evaluation mode: eval_capacity_factor, no jitter


@jax.jit
def expert_choices(params, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        _, inter = model.apply({"params": params}, batch, mutable=["intermediates"])
    (sown,) = inter["intermediates"]["moe"]
    return sown["expert_index"]                                   # [L_moe, B, P + T, K]


E, P = int(config.model.moe.num_experts), pipe.num_patches
counts = None  # [L_moe, 2 (image, text), E]
for b in pipe.eval_batches()[:EVAL_BATCHES]:
    rows = len(b["task_id"])
    batch = sharding.shard_full_batch(mesh, evaluation.pad_batch(b, sharding.batch_shards(mesh)))
    with jax.set_mesh(mesh):
        index = np.asarray(jax.device_get(expert_choices(params, batch)))[:, :rows]
    valid = np.concatenate([b["image_mask"], b["text_mask"]], axis=1)        # [B, P + T]
    is_text = np.arange(valid.shape[1]) >= P
    c = np.zeros((index.shape[0], 2, E))
    for layer in range(index.shape[0]):
        for modality, where in enumerate((valid & ~is_text, valid & is_text)):
            c[layer, modality] = np.bincount(index[layer][where].ravel(), minlength=E)
    counts = c if counts is None else counts + c
print(f"tokens routed per MoE layer: {int(counts[0, 0].sum()):,} image-patch, "
      f"{int(counts[0, 1].sum()):,} text (x k choices)")

# %%
share = counts / counts.sum(-1, keepdims=True)       # per layer and modality, sums to 1
layers = share.shape[0]
fig, axes = plt.subplots(1, layers, figsize=(5.5 * layers, 3.4), squeeze=False)
x = np.arange(E)
for layer, ax in enumerate(axes[0]):
    ax.bar(x - 0.2, share[layer, 0], 0.4, label="image patches")
    ax.bar(x + 0.2, share[layer, 1], 0.4, label="text tokens")
    ax.axhline(1 / E, color="gray", ls=":", lw=1)
    ax.set_xticks(x)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of the modality's choices")
    ax.set_title(f"MoE layer {layer} (block {(layer + 1) * int(config.model.moe.every) - 1})")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
total = counts.sum(1)                              # [L_moe, E] choices per expert
image_part = np.where(total > 0, counts[:, 0] / np.maximum(total, 1), np.nan)
for layer in range(layers):  # nan: an expert no token chose
    print(f"MoE layer {layer}: image share of each expert's tokens",
          np.array2string(image_part[layer], precision=2))

# %% [markdown]
# Read it as: an expert whose image share is near 1 serves (almost) only image patches,
# near 0 only text; a dotted line marks the uniform share 1/E. In our 60-step run of the
# defaults several experts of each layer already served mostly one modality; how the split
# develops over a full run is what raising `STEPS` shows (not measured here). The same
# analysis works for the other routers (`OVERRIDES` above); the `domain` router splits
# image and text by construction.
