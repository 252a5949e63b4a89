"""A finished (or running) pretraining run's newest checkpoint: config, model and params."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections

from m6jax import checkpoint, offload, schema, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.model.build import build_model
from m6jax.train.state import dummy_batch


def newest_checkpoint(workdir: str) -> str:
    """WORKDIR/checkpoints/<newest step>; ValueError naming the pretrain command if none."""
    root = checkpoint.checkpoint_dir(workdir)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise ValueError(f"no checkpoint in {root}: train one first, e.g.\n  python experiments/"
                         f"pretrain.py --config=experiments/configs/m6.py:tiny --workdir={workdir}")
    return os.path.join(root, str(steps[-1]))


def load_config(step_dir: str) -> ml_collections.ConfigDict:
    """The config the run saved in the checkpoint's meta item, with the model of the
    checkpoint's Pseudo-to-Real stage (a run that delinked has per-layer params)."""
    path = os.path.join(step_dir, "meta", "metadata")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        return p2r.checkpoint_config(schema.complete(ml_collections.ConfigDict(meta["config"])),
                                     meta.get("stage", checkpoint.STAGE_DEFAULT))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read the run's config from {path} ({e}); is {step_dir} a "
                         "checkpoint written by experiments/pretrain.py?") from e


def load_run(workdir: str, devices=None):
    """(config, model, mesh, params, param_shardings, checkpoint dir) of the newest
    checkpoint in `workdir`, params in the run's own layout: its fsdp/tensor/expert axes,
    `data` taking the remaining devices (`sharding.run_layout`), and its offload setting
    (a streamed stack in host memory, which the decoders stream: `load_params`)."""
    step_dir = newest_checkpoint(workdir)
    config = load_config(step_dir)
    d = config.data
    devices = list(devices) if devices is not None else jax.devices()
    mesh = sharding.make_mesh(sharding.run_layout(config.mesh, len(devices)), devices)
    model = build_model(config)
    num_patches = (d.image_size // d.patch_size) ** 2
    example = dummy_batch(1, num_patches, d.patch_size ** 2 * d.image_channels, d.text_len)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
    param_sh = sharding.tree_shardings(mesh, boxed)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.meta.unbox(boxed), param_sh)
    stage = checkpoint.read_meta(step_dir).get("stage", checkpoint.STAGE_DEFAULT)
    with jax.set_mesh(mesh):  # an offloaded run's params in its stored layout
        params, param_sh = load_params(config, stage, step_dir, abstract)
    return config, model, mesh, params, param_sh, step_dir


def load_params(config, stage: str, step_dir: str, abstract_params):
    """(params, their shardings) of a checkpoint for decoding, in the run's stored
    layout: with the run's offload setting a streamed stack is read into host memory and
    split there, and the decoders stream it (`m6jax.offload`); otherwise (or a Pseudo
    stack, one unit) the params sit on the device. `abstract_params`: canonical
    ShapeDtypeStructs carrying the device shardings."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    only = lambda tree: offload.ParamsOnly(params=tree, opt_state={})
    plan = offload.OffloadPlan(config, stage, only(shardings), only(abstract_params))
    if not plan.streamed:
        return checkpoint.load_params(step_dir, abstract_params), shardings
    params = checkpoint.load_params(step_dir, plan.restore_target(only(abstract_params)).params)
    return plan.to_stored_params(params), plan.decode_shardings(shardings)
