"""Writes the notebooks in this folder (outputs cleared): edit here, then run

    python notebooks/make_notebooks.py

Each notebook: a Colab/local set-up cell, a `parameters` cell (papermill tag) with
defaults small enough for a laptop CPU, then training through `m6jax.train.loop.train`
and plots. tests/test_notebooks.py executes them with even smaller parameters.
"""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text):
    return new_markdown_cell(text.strip())


def code(text, tags=()):
    cell = new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


SETUP = r'''
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
'''

HELPERS = r'''
import json
import warnings

import numpy as np
import matplotlib.pyplot as plt
%matplotlib inline

warnings.filterwarnings("ignore", message="Glyph .* missing")  # CJK text, no CJK font
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets


if not WORKDIR:  # made here, so an injected WORKDIR leaves no empty temp directory
    import tempfile
    WORKDIR = tempfile.mkdtemp(prefix="m6jax___NAME___")


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
'''


def helpers(name):
    return code(HELPERS.replace("__NAME__", name))


def quickstart():
    return [
        md(r'''
# M6 quickstart: train the tiny M6, plot its losses, caption held-out digits

M6 (Lin et al. 2021) is one transformer over `[image patches | text]`: attention masks
make it an encoder (image patches and the text prefix see each other) and a decoder
(target text sees the prefix and earlier targets) at once. The tiny config
(`experiments/configs/m6.py:tiny`) trains on scikit-learn's 8x8 handwritten digits, each
cut into 16 patches of 2x2 pixels, with Chinese and English captions ("手写数字七",
"the number seven"), plus Chinese reviews and news for the text-only tasks. The four
tasks, mixed in every batch: `caption`, `caption_denoise`, `denoise`, `lm`.

This notebook trains it (briefly by default), plots the training losses and shows
held-out digits with the captions the model generates for them.
'''),
        code(SETUP),
        md(r'''
## Parameters

Small defaults that run on a laptop CPU in a minute or two. For a real run set
`STEPS = 1000` and `OVERRIDES = {}` (the README's quickstart: 93.5% caption accuracy);
on a GPU add `"model.dtype": "bfloat16"`.
'''),
        code(r'''
STEPS = 60          # training steps; 1000 for the README's quickstart numbers
LOG_EVERY = 20      # a metrics.jsonl line (and a progress line) every N steps
OVERRIDES = {"batch_size": 16, "model.num_layers": 2}  # config fields, dotted; {} = tiny as is
TOKENIZER = ""      # path of a tokenizer.model to reuse; "" = train one into WORKDIR
WORKDIR = ""        # "" = a fresh temporary directory (m6jax_quickstart_*)
NUM_IMAGES = 12     # held-out digits to show
''', tags=["parameters"]),
        helpers("quickstart"),
        md(r'''
## Train

`m6jax.train.loop.train(config, workdir)` is what `experiments/pretrain.py` runs: it
writes `metrics.jsonl` (one line per logged step), `summary.json`, TensorBoard events
and a final checkpoint, and returns the summary.
'''),
        code(r'''
import m6 as m6_configs
from m6jax.train.loop import train

config = configure(m6_configs.get_config("tiny"))
summary = train(config, WORKDIR)
print(f"{summary['num_params']:,} parameters | eval loss {summary['initial_eval_loss']:.3f} -> "
      f"{summary['eval_loss']:.3f} | train {summary['train_s']:.0f} s | workdir {WORKDIR}")
'''),
        md(r'''
## Loss curves

`loss` is the step's text cross-entropy over all target tokens; `loss/<task>` the same
over one task's tokens. One step's loss is noisy (its batch mixes tasks at random), so
the curves are exponential moving averages over the logged steps, each task's over the
steps whose batch had it; the red points are the held-out eval loss (`eval.jsonl`).
Captioning is the easiest task (a few dozen distinct captions); `lm` and `denoise` on
Chinese prose stay far higher.
'''),
        code(r'''
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
'''),
        md(r'''
## Captions for held-out digits

The 20% held-out images (a fixed split, independent of the seed) get greedy captions
from the prompt `<caption> <en>` or `<caption> <zh>`: the model sees the image patches
and the prompt, and decodes until end-of-sequence. `caption_eval_set()` gives the
patches; `images.patchify` cut each image row-major into 2x2 blocks, which `unpatchify`
below undoes for display. After a short run the captions are often empty or wrong:
raise `STEPS`.
'''),
        code(r'''
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
'''),
        md(r'''
## Caption accuracy

A caption is right when it names exactly the true digit (in its language). The training
loop measures it on all held-out digits, both languages (`summary.json`).
'''),
        code(r'''
shown = np.mean([pipe.caption_class(captions[lang][i], lang) == labels[i]
                 for lang in ("en", "zh") for i in range(n)])
print(f"caption accuracy, all held-out digits: {summary['caption_accuracy']:.1%} "
      f"(en {summary['caption_accuracy_en']:.1%}, zh {summary['caption_accuracy_zh']:.1%}); "
      f"on the {n} shown: {shown:.1%}")
'''),
    ]


def moe_routing():
    return [
        md(r'''
# M6-MoE: expert load during training and routing by modality

`experiments/configs/m6_moe.py:tiny` is the tiny M6 with a Mixture-of-Experts
feed-forward layer in every second block: 8 experts, Switch top-1 routing, capacity
factor 1.25 (a choice over an expert's capacity is dropped: the residual carries the
token), a load-balancing loss (weight 0.01) and a router z-loss. This notebook trains it,
plots what the training loop logs about expert load, then runs the trained model on
held-out image+text batches and shows how image-patch tokens and text tokens spread over
the experts.
'''),
        code(SETUP),
        md(r'''
## Parameters

For a real run: `STEPS = 1000`, `OVERRIDES = {}` (the README: caption accuracy 90.7%,
final load max/mean 1.38). `OVERRIDES` may change routing, e.g.
`{"model.moe.router": "prototype", "model.moe.k": 2}` (M6-T's expert prototyping) or
`{"model.moe.aux_loss_weight": 0.0}` (no balancing loss).
'''),
        code(r'''
STEPS = 60
LOG_EVERY = 10
OVERRIDES = {"batch_size": 16}   # config fields, dotted; {} = m6_moe.py:tiny as is
TOKENIZER = ""                   # a tokenizer.model to reuse; "" = train one into WORKDIR
WORKDIR = ""        # "" = a fresh temporary directory (m6jax_moe_*)
EVAL_BATCHES = 4                 # held-out batches for the routing analysis
''', tags=["parameters"]),
        helpers("moe"),
        md('## Train'),
        code(r'''
import m6_moe
from m6jax.train.loop import train

config = configure(m6_moe.get_config("tiny"))
summary = train(config, WORKDIR)
print(f"{summary['num_params']:,} parameters | eval loss {summary['eval_loss']:.3f} | "
      f"caption accuracy {summary['caption_accuracy']:.1%} | final load max/mean "
      f"{summary['expert_load_max_over_mean']:.2f} | dropped {summary['dropped_fraction']:.1%}")
'''),
        md(r'''
## Expert load over training

Per logged step `metrics.jsonl` holds (`m6jax/train/moe_metrics.py`):
`moe/load_max_over_mean` (the busiest expert's share of routing choices over the mean
share, worst MoE layer; 1 = perfectly balanced), `moe/dropped_fraction` (choices over
capacity, worst layer), `moe/router_entropy`, `moe/balance_loss` (1 when uniform),
`moe/z_loss` and `moe/aux_loss`. Per-expert loads of every layer go to TensorBoard as
histograms (`moe/load_over_mean/layerN`); the per-expert picture below comes from the
trained model instead.
'''),
        code(r'''
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
'''),
        md(r'''
## Routing by modality

The MoE layer sows, besides the load metrics, `expert_index` [B, S, K]: the experts each
token chose (before capacity). Applying the model with `mutable=["intermediates"]`
returns them stacked over MoE layers, `[L_moe, B, P + T, K]`, over the sequence
`[P image patches | T text tokens]`. Counting image-patch tokens (where `image_mask`)
and text tokens (where `text_mask`) per expert shows whether the router has learned to
separate the modalities. The held-out batches mix captioning examples (16 patches +
caption text) and text-only `lm` examples.
'''),
        code(r'''
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
'''),
        code(r'''
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
'''),
        md(r'''
Read it as: an expert whose image share is near 1 serves (almost) only image patches,
near 0 only text; a dotted line marks the uniform share 1/E. In our 60-step run of the
defaults several experts of each layer already served mostly one modality; how the split
develops over a full run is what raising `STEPS` shows (not measured here). The same
analysis works for the other routers (`OVERRIDES` above); the `domain` router splits
image and text by construction.
'''),
    ]


def pseudo_to_real():
    return [
        md(r'''
# Pseudo-to-Real: share the layers first, delink them later

**The technique** (M6-10T, Lin et al. 2021). A deep "Pseudo giant" is trained first in
which every layer applies one shared block of weights, so it costs the compute of the
full-depth model but has the parameters (and optimizer state) of a single layer. At a
switch step the shared weights are *delinked*: copied into each layer of the "Real
giant", whose outputs at that moment equal the Pseudo model's exactly, and training goes
on with independent layers. The paper reports that this converges much faster for a
10T-parameter model than training the Real model from scratch.

This notebook trains, on the same batches, the Real model from scratch and
Pseudo-to-Real runs with one or two switch points
(`experiments/configs/p2r_ablation.py`: 12 layers of width 64), compares their loss by
step and by training wall time, and checks that at the switch every layer is a copy of
the shared block. `experiments/p2r_ablation.py` is the full-length version.
'''),
        code(SETUP),
        md(r'''
## Parameters

For a real comparison use `STEPS = 1000`, `SWITCH_STEPS = [100, 300]`, `OVERRIDES = {}`
(the settings of `experiments/p2r_ablation.py`: 12 layers of width 64, batch 8, the
`scaled` optimizer handoff).
'''),
        code(r'''
STEPS = 60
SWITCH_STEPS = [15]   # one Pseudo-to-Real run per switch step
LOG_EVERY = 5
OVERRIDES = {"model.num_layers": 4}   # config fields, dotted; {} = p2r_ablation.py as is
TOKENIZER = ""        # a tokenizer.model to reuse; "" = train one (shared by all runs)
WORKDIR = ""        # "" = a fresh temporary directory (m6jax_p2r_*)
''', tags=["parameters"]),
        helpers("p2r"),
        md(r'''
## Train scratch and Pseudo-to-Real

Each Pseudo-to-Real run checkpoints at its switch step (the last Pseudo state), so the
delinking can be inspected below. The switch happens inside the run: the loop delinks
the state, re-jits the step for the Real model and goes on.
'''),
        code(r'''
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
'''),
        md(r'''
## Loss by step and by training wall time

`metrics.jsonl` logs `train_s` (wall time in training steps: compiles and the delinking
included, evaluation excluded) and `pseudo_stage` (1 while the model is the Pseudo
giant). Every run sees the same batch at the same step, so the curves compare like with
like. The wall-time curves start late (the first step compiles) and a Pseudo-to-Real run
pays a second compile at its switch: at the tiny default lengths these dominate. Pseudo steps cost about what Real steps cost (same depth, same FLOPs): the gain
the paper reports is in convergence, plus memory, not in step time.
'''),
        code(r'''
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
'''),
        md(r'''
## At the switch, every layer is a copy of the shared block

The Pseudo model's stack parameters have no `layers` axis (one block); the Real model's
have a leading `layers` axis. `m6jax.pseudo_to_real.delink_params` broadcasts each shared
leaf along that axis: the layers start identical, then train apart. Below: the parameter
counts of the two stages, an exact check on the delinked tree, and how far each Real
layer's weights moved from the shared block by the end of the run.
'''),
        code(r'''
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
'''),
        code(r'''
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
'''),
        md(r'''
At the switch all bars would be 0; after it the layers diverge, each from the same
starting point. With the short defaults the losses are close and noisy;
`experiments/p2r_ablation.py` runs the full-length comparison and writes its table.
'''),
    ]


NOTEBOOKS = {"quickstart.ipynb": quickstart, "moe_routing.ipynb": moe_routing,
             "pseudo_to_real.ipynb": pseudo_to_real}


def main():
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells(), metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}, "colab": {"provenance": []}})
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives small diffs
            cell.id = f"{name.split('.')[0]}-{i}"
        nbformat.validate(nb)
        nbformat.write(nb, os.path.join(HERE, name))
        print("wrote", os.path.join(HERE, name))


if __name__ == "__main__":
    main()
