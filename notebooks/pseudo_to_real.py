# %% [markdown]
# # Pseudo-to-Real: share the layers first, delink them later
#
# **The technique** (M6-10T, Lin et al. 2021). A deep "Pseudo giant" is trained first in
# which every layer applies one shared block of weights, so it costs the compute of the
# full-depth model but has the parameters (and optimizer state) of a single layer. At a
# switch step the shared weights are *delinked*: copied into each layer of the "Real
# giant", whose outputs at that moment equal the Pseudo model's exactly, and training goes
# on with independent layers. The paper reports that this converges much faster for a
# 10T-parameter model than training the Real model from scratch.
#
# This notebook trains, on the same batches, the Real model from scratch and
# Pseudo-to-Real runs with one or two switch points
# (`experiments/configs/p2r_ablation.py`: 12 layers of width 64), compares their loss by
# step and by training wall time, and checks that at the switch every layer is a copy of
# the shared block. `experiments/p2r_ablation.py` is the full-length version.

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
# For a real comparison use `STEPS = 1000`, `SWITCH_STEPS = [100, 300]`, `OVERRIDES = {}`
# (the settings of `experiments/p2r_ablation.py`: 12 layers of width 64, batch 8, the
# `scaled` optimizer handoff).

# %% tags=["parameters"]
STEPS = 60
SWITCH_STEPS = [15]   # one Pseudo-to-Real run per switch step
LOG_EVERY = 5
OVERRIDES = {"model.num_layers": 4}   # config fields, dotted; {} = p2r_ablation.py as is
TOKENIZER = ""        # a tokenizer.model to reuse; "" = train one (shared by all runs)
WORKDIR = ""        # "" = a fresh temporary directory (m6jax_p2r_*)

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
    WORKDIR = tempfile.mkdtemp(prefix="m6jax_p2r_")


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
# ## Train scratch and Pseudo-to-Real
#
# Each Pseudo-to-Real run checkpoints at its switch step (the last Pseudo state), so the
# delinking can be inspected below. The switch happens inside the run: the loop delinks
# the state, re-jits the step for the Real model and goes on.

# %%
import p2r_ablation
from m6jax.train.loop import train

if not TOKENIZER:
    TOKENIZER = os.path.join(WORKDIR, "tokenizer.model")  # trained by the first run
runs, configs, summaries = ["scratch"] + [f"p2r_{s}" for s in SWITCH_STEPS], {}, {}
for run in runs:
    c = configure(p2r_ablation.get_config(run))
    if run != "scratch":  # keep the checkpoint of the switch step
        c.checkpoint_every = c.pseudo_to_real.switch_step
        c.keep_checkpoints = STEPS // c.checkpoint_every + 1
    configs[run] = c
    summaries[run] = train(c, os.path.join(WORKDIR, run))
    s = summaries[run]
    print(f"{run}: {s['num_params']:,} parameters at the end | final train loss "
          f"{s['final_train_loss']:.3f} | eval loss {s['eval_loss']:.3f} | train {s['train_s']:.1f} s")

# %% [markdown]
# ## Loss by step and by training wall time
#
# `metrics.jsonl` logs `train_s` (wall time in training steps: compiles and the delinking
# included, evaluation excluded) and `pseudo_stage` (1 while the model is the Pseudo
# giant). Every run sees the same batch at the same step, so the curves compare like with
# like. The wall-time curves start late (the first step compiles) and a Pseudo-to-Real run
# pays a second compile at its switch: at the tiny default lengths these dominate. Pseudo steps cost about what Real steps cost (same depth, same FLOPs): the gain
# the paper reports is in convergence, plus memory, not in step time.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for run in runs:
    m = read_metrics(os.path.join(WORKDIR, run))
    for ax, x in zip(axes, (m["step"], m["train_s"])):
        line, = ax.plot(x, m["loss"], label=run)
        pseudo = m["pseudo_stage"] > 0
        if pseudo.any():  # the Pseudo stage drawn thicker, with markers
            ax.plot(x[pseudo], m["loss"][pseudo], "o-", color=line.get_color(), lw=4, ms=6,
                    alpha=0.4)
for s in SWITCH_STEPS:
    axes[0].axvline(s, color="gray", ls=":", lw=1)
axes[0].set_xlabel("step (dotted: switch steps)")
axes[1].set_xlabel("training wall time (s)")
for ax in axes:
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
fig.suptitle("scratch vs Pseudo-to-Real (thick: Pseudo stage)", fontsize=10)
plt.show()

# %% [markdown]
# ## At the switch, every layer is a copy of the shared block
#
# The Pseudo model's stack parameters have no `layers` axis (one block); the Real model's
# have a leading `layers` axis. `m6jax.pseudo_to_real.delink_params` broadcasts each shared
# leaf along that axis: the layers start identical, then train apart. Below: the parameter
# counts of the two stages, an exact check on the delinked tree, and how far each Real
# layer's weights moved from the shared block by the end of the run.

# %%
from m6jax import flops
from m6jax import pseudo_to_real as p2r

run = f"p2r_{SWITCH_STEPS[0]}"
c, run_dir = configs[run], os.path.join(WORKDIR, run)
pseudo, mesh, _, pipe = load_trained(c, run_dir, stage="pseudo", step=SWITCH_STEPS[0])
real_end, _, real_shardings, _ = load_trained(c, run_dir, stage="real", pipe=pipe)
real_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), real_end)
with jax.set_mesh(mesh):
    delinked = p2r.delink_params(pseudo, real_abstract, real_shardings.params)
print(f"Pseudo giant: {flops.count_params(pseudo):,} parameters | Real giant: "
      f"{flops.count_params(delinked):,} (summary.json num_params: {summaries[run]['num_params']:,}; "
      f"scratch: {summaries['scratch']['num_params']:,})")

shared_block = pseudo["stack"]["layers"]
per_layer = delinked["stack"]["layers"]
copies = jax.tree.map(lambda s, r: all(np.array_equal(np.asarray(r[i]), np.asarray(s))
                                       for i in range(r.shape[0])), shared_block, per_layer)
print("every layer of every stack leaf equals the shared block:", all(jax.tree.leaves(copies)))
for path, leaf in jax.tree_util.tree_flatten_with_path(per_layer)[0][:3]:
    print(f"  {jax.tree_util.keystr(path)}: shared {np.shape(leaf)[1:]} -> real {np.shape(leaf)}")


# %%
def relative_change(end, start):
    """Per layer: ||end_l - start|| / ||start|| over all stack leaves."""
    num = sum(np.sum((np.asarray(e) - np.asarray(s)[None]) ** 2, axis=tuple(range(1, np.ndim(e))))
              for e, s in zip(jax.tree.leaves(end), jax.tree.leaves(start)))
    den = sum(np.sum(np.asarray(s) ** 2) for s in jax.tree.leaves(start))
    return np.sqrt(num / den)


change = relative_change(real_end["stack"]["layers"], shared_block)
plt.figure(figsize=(5, 3))
plt.bar(np.arange(len(change)), change)
plt.xticks(np.arange(len(change)))
plt.xlabel("layer")
plt.ylabel("||W_layer - W_shared|| / ||W_shared||")
plt.title(f"{run}: how far each layer moved after the switch", fontsize=9)
plt.show()

# %% [markdown]
# At the switch all bars would be 0; after it the layers diverge, each from the same
# starting point. With the short defaults the losses are close and noisy;
# `experiments/p2r_ablation.py` runs the full-length comparison and writes its table.
