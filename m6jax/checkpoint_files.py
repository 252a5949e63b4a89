"""What a checkpoint directory holds, read without a Checkpointer: the step directory of
a path, its JSON meta, its params alone (`init_from`), and whether a saved tree fits the
current model. The meta: data-iterator position, training stage, pipeline counters, the
initial eval losses, `train_s`, and the config (`config_json`).
"""
from __future__ import annotations

import json
import os

import flax
import jax
import orbax.checkpoint as ocp

from m6jax.errors import InputError

STAGE_DEFAULT = "real"  # checkpoints written before Pseudo-to-Real have no other stage


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def check_fits(step: int, directory: str, saved, abstract_state) -> None:
    def shapes(tree):  # "opt_state/1/0/mu/..." whether a level is a tuple, list or dict
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
                tuple(getattr(x, "shape", ())) for path, x in leaves}
    want = shapes(flax.serialization.to_state_dict(abstract_state))
    have = shapes(saved)
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        k = diff[0]
        raise InputError(
            f"checkpoint step {step} in {directory} does not fit this config: {k} is "
            f"{have.get(k, 'absent')} there and {want.get(k, 'absent')} here ({len(diff)} "
            "arrays differ). Use another --workdir, or --config.init_from to start from its "
            "params with the same model shape")


def step_dir(path: str) -> str:
    """One checkpoint step directory from a run's workdir, its `checkpoints/` directory
    (the newest step) or a `checkpoints/<step>` directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(os.path.join(path, "state")):  # a checkpoints root: take the newest
        steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
        if not steps:
            raise ValueError(f"init_from={path!r} holds no checkpoint; give a run's workdir, "
                             "its checkpoints/ directory or one checkpoints/<step> directory")
        path = os.path.join(path, str(steps[-1]))
    return path


def read_meta(path: str) -> dict:
    """The JSON meta (data position, stage, config, ...) of a checkpoint `step_dir(path)`.

    Read as a plain file, not through an orbax Checkpointer: that one waits at a barrier
    for every process, and process 0 reads metas alone when it picks the step to restore.
    """
    with open(os.path.join(step_dir(path), "meta", "metadata"), encoding="utf-8") as f:
        return json.load(f)


def load_params(path: str, abstract_params):
    """Params only from a checkpoint (`.../checkpoints/<step>` or `.../checkpoints`).

    For `init_from`: optimizer state, step and RNG of the source run are ignored, so the
    fine-tuning run may use another optimizer or schedule; shapes must match the model.
    """
    path = step_dir(path)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True))
    return out["params"]


def config_json(config) -> dict:
    """The config as plain JSON (stored in each checkpoint's meta, for the record)."""
    return json.loads(config.to_json_best_effort())
