"""The pretrained run a fine-tune starts from: its checkpoint, config and tokenizer.

The fine-tune model's shape and data layout (image size, patch size, text_len, vocab)
are never configured twice: they are read from the config that pretraining stored in
each checkpoint's `meta`, and the tokenizer is the one in the pretraining workdir.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ml_collections

from m6jax import checkpoint, schema
from m6jax import pseudo_to_real as p2r

_PATH_HELP = ("give --config.init_from=PRETRAIN_WORKDIR (the --workdir of "
              "experiments/pretrain.py), its checkpoints/ directory or one checkpoints/<step> "
              "directory")
# Fields of the fine-tune config that replace the pretraining run's values.
_RUN_FIELDS = ("seed", "total_steps", "batch_size", "log_every", "mesh", "optimizer", "init_from")


@dataclass
class Pretrained:
    step_dir: str  # .../checkpoints/<step>: what checkpoint.load_params reads
    workdir: str
    config: dict  # the pretraining config as stored in the checkpoint meta (JSON)
    tokenizer_path: str
    stage: str = "real"  # Pseudo-to-Real stage of the checkpoint: its params' layout


def resolve(init_from: str) -> Pretrained:
    """Finds the newest checkpoint under `init_from` and the run it belongs to.

    Accepts what `checkpoint.load_params` accepts; raises ValueError naming
    `config.init_from` and what to pass otherwise.
    """
    if not init_from:
        raise ValueError(f"config.init_from is empty; {_PATH_HELP}")
    if not os.path.isdir(os.path.abspath(os.path.expanduser(init_from))):
        raise ValueError(f"config.init_from={init_from!r} is not a directory; {_PATH_HELP}")
    try:  # the same resolution as pretraining's init_from
        path = checkpoint.step_dir(init_from)
    except ValueError:
        raise ValueError(f"config.init_from={init_from!r} holds no checkpoint; {_PATH_HELP}") from None
    meta_file = os.path.join(path, "meta", "metadata")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        config = meta["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"config.init_from={init_from!r}: {meta_file} has no stored pretraining "
                         f"config ({type(e).__name__}); the checkpoint must come from "
                         "experiments/pretrain.py, which stores it") from e
    workdir = os.path.dirname(os.path.dirname(path))
    tokenizer_path = config["data"].get("tokenizer_path") or os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        raise ValueError(f"config.init_from={init_from!r}: the pretraining tokenizer "
                         f"{tokenizer_path} is missing; fine-tuning must use the tokenizer the "
                         f"checkpoint was trained with, so {_PATH_HELP} inside that run's workdir")
    return Pretrained(path, workdir, config, tokenizer_path, meta.get("stage", "real"))


def run_config(ft_config, pretrained: Pretrained) -> ml_collections.ConfigDict:
    """The pretraining config with the fine-tune's run fields (`_RUN_FIELDS`) put over it.

    The result is what `validate_config`, `build_model` and `Pipeline` read: model and
    data sections from pretraining (data.tokenizer_path pinned to the pretraining
    tokenizer), steps/batch/optimizer/mesh/seed from the fine-tune config.
    """
    c = schema.complete(ml_collections.ConfigDict(pretrained.config))  # an older run's too
    saved_mesh = dict(c.mesh)
    for field in _RUN_FIELDS:
        value = ft_config[field]
        c[field] = ml_collections.ConfigDict(value.to_dict()) if hasattr(value, "to_dict") else value
    # mesh.fsdp/tensor/expert/stage = 0 (the fine-tune configs' default): the pretraining run's
    # value, so a model that needed FSDP or tensor/expert parallelism stays sharded.
    for axis in ("fsdp", "tensor", "expert", "stage"):
        if int(c.mesh[axis]) == 0:
            c.mesh[axis] = int(saved_mesh.get(axis, 1))
    if -1 in (c.mesh.fsdp, c.mesh.tensor, c.mesh.expert) and c.mesh.data == -1:
        c.mesh.data = 1  # the run let a model axis take the remaining devices
    c.eval_every = c.total_steps
    c.checkpoint_every = 0  # fine-tune runs are short and not checkpointed
    c.data.tokenizer_path = pretrained.tokenizer_path
    # The fine-tune's sections replace whole ones: their fields it does not set take the
    # schema's defaults.
    return p2r.checkpoint_config(schema.complete(c), pretrained.stage)
