"""Pipeline parallelism: the scanned stack split over a `stage` mesh axis, one jitted step.

An SPMD pipeline after MaxText's: the stack's U units are cut into S x R chunks of
L = U / (S R) units; chunk c = r S + s runs on stage s in repeat r (R = 1 is GPipe's
fill-drain, R > 1 the circular schedule). The batch is cut into M microbatches. Each
iteration every stage applies `scan_units` to its chunk (one `jax.vmap` over stages,
whose stage dimension is sharded over `stage`, so each stage group computes only its
own chunk), then the stage outputs move one stage on by a `ppermute` inside
`shard_map` (a collective-permute in the HLO). Stage 0 reads its input from a buffer of
M microbatches that the last stage writes back into: microbatch m leaves the last stage
of repeat r at iteration r M + m + S - 1 and re-enters stage 0 at (r + 1) M + m, which is
later as long as M >= S. The backward pass is JAX's transpose of that loop, so the
backward schedule is the forward one reversed.

Schedule arithmetic: item k = r M + m (k < R M) is at stage s in iteration k + s, so the
loop runs R M + S - 1 iterations, each stage idle in S - 1 of them:
bubble = (S - 1) / (R M + S - 1).

The stored parameters keep the canonical [units, ...] layout (checkpoints do not know
about stages); the rules table shards the unit axis over `stage`, so with R = 1 each
stage group holds exactly its own chunk. With R > 1 stage s runs chunks s, S + s, ...,
which the contiguous shards do not hold: the step reshuffles those weights between
stage groups once per step (an all-to-all of (R - 1) / R of them, and the transpose for
the gradient). Inside a stage each leaf keeps its own logical axes (`unit_axes`, stage
in front): constraining the chunks to ("stage", None, ...) alone had GSPMD gather every
expert of a stage's chunk and FSDP gather its whole chunk before the loop; with them the
experts stay sharded and FSDP gathers one unit at a time in the unit scan. A Pseudo
stack's shared weights (no unit axis) are replicated over stages; their gradient is
summed over stages by the transpose of that broadcast.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

STAGE_AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: `stages` (mesh.stage), `microbatches`, `repeats` (circular)."""
    stages: int = 1
    microbatches: int = 1
    repeats: int = 1
    remat_stage: bool = True  # keep only each iteration's stage inputs for the backward

    @property
    def active(self) -> bool:
        return self.stages > 1

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Fraction of stage-iterations idle: (S - 1) / (R M + S - 1)."""
        return (self.stages - 1) / self.iterations

    def describe(self) -> str:
        kind = "circular" if self.repeats > 1 else "fill-drain (GPipe)"
        return (f"pipeline: {self.stages} stages x {self.repeats} repeats, {self.microbatches} "
                f"microbatches, {kind}, {self.iterations} iterations, bubble {self.bubble:.1%}")


def section(config):
    """The config's `pipeline` section as a dict (fields: m6jax/schema.py)."""
    sec = config.pipeline
    return dict(microbatches=int(sec.microbatches), repeats=int(sec.repeats),
                remat_stage=bool(sec.remat_stage))


def from_config(config) -> Schedule:
    return Schedule(stages=int(config.mesh.stage), **section(config))


def validate(config, sizes: dict[str, int], units: int) -> None:
    """Refuses a pipeline config that cannot be scheduled, naming the field (`units`: the
    scanned units of the stack, `sizes`: the resolved mesh)."""
    stages = sizes["stage"]
    sec = section(config)
    m, r = sec["microbatches"], sec["repeats"]
    if m < 1 or r < 1:
        raise ValueError(f"pipeline.microbatches={m} and pipeline.repeats={r} must be >= 1")
    if stages == 1:
        if m > 1 or r > 1:
            raise ValueError(f"pipeline.microbatches={m}, pipeline.repeats={r} need mesh.stage > 1"
                             "; to split a batch without a pipeline use "
                             "optimizer.grad_accum_steps")
        return
    if units % (stages * r):
        raise ValueError(f"mesh.stage={stages} x pipeline.repeats={r} does not divide the "
                         f"{units} scanned units (model.num_layers, or num_layers / "
                         "moe.every for an MoE stack)")
    if m % stages:
        raise ValueError(f"pipeline.microbatches={m} is not a multiple of mesh.stage={stages} "
                         "(a microbatch must leave the last stage before it re-enters the "
                         "first; use microbatches >= 2 x stages for a small bubble)")
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    accum = int(config.optimizer.grad_accum_steps)
    if config.batch_size // accum % (m * shards):
        raise ValueError(f"batch_size={config.batch_size} (/ optimizer.grad_accum_steps={accum})"
                         f" is not divisible by pipeline.microbatches={m} x the {shards} batch "
                         "shards (mesh.data*mesh.fsdp*mesh.expert): each microbatch is split "
                         "over the batch shards")


def _ppermute_next(x, mesh):
    """[S, ...] stage-sharded -> stage s's block moved to stage s + 1 (S - 1 wraps to 0)."""
    s = mesh.shape[STAGE_AXIS]
    perm = [(i, (i + 1) % s) for i in range(s)]
    spec = P(STAGE_AXIS)
    return jax.shard_map(lambda b: jax.lax.ppermute(b, STAGE_AXIS, perm), mesh=mesh,
                         in_specs=spec, out_specs=spec, axis_names={STAGE_AXIS},
                         check_vma=False)(x)


def _split(tree, m: int):
    """Leaves [B, ...] -> [M, B / M, ...]; rows j, j + M, ... form microbatch j, so each
    device keeps its own rows of a batch-sharded array (as grad accumulation does)."""
    return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 0, 1),
                        tree)


def _merge(a):
    return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def run(stage_fn, layers, x, args, schedule: Schedule, constrain, shared_units: int = 0,
        unit_axes=None):
    """Runs the stack as a pipeline: x [B, S, D] -> (x [B, S, D], per-unit outputs [U, ...]).

    stage_fn(chunk_params, x [mb, S, D], args, chunk, microbatch) -> (x, outputs [L, ...])
    applies one chunk of L units (`scan_units`). layers: the stacked params [U, ...], or
    with `shared_units` = U the shared params of a Pseudo stack (no unit axis). args:
    what each unit takes after x, leaves [B, ...]. `constrain(a, logical_axes)` pins an
    activation's sharding. unit_axes: each leaf of one unit's params -> its logical axis
    names (a tuple; None: replicated inside a stage). Per-unit outputs (MoE metrics) are
    the microbatches' mean; integer leaves (MoE `expert_index`, per token) are not kept.
    """
    S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
    mesh = jax.sharding.get_abstract_mesh()
    units = shared_units or jax.tree.leaves(layers)[0].shape[0]
    L = units // (S * R)
    if shared_units:
        chunks, param_axis = layers, None
    else:  # [U, ...] -> [S, R, L, ...]: chunk r S + s at [s, r]
        chunks = jax.tree.map(lambda p: jnp.swapaxes(p.reshape(R, S, L, *p.shape[1:]), 0, 1),
                              layers)
        # Each leaf keeps its own axes inside a stage (fsdp / tensor / expert shards):
        # `stage` on the stage dimension, nothing on repeat and unit, then the unit's names.
        axes = unit_axes or jax.tree.map(lambda p: (None,) * (p.ndim - 3), chunks)
        chunks = jax.tree.map(lambda p, a: constrain(p, ("stage", None, None, *a)), chunks, axes,
                              is_leaf=lambda a: isinstance(a, tuple))
        param_axis = 0
    x_mb = constrain(_split(x, M), (None, "batch", "length", "act_embed"))  # [M, mb, S, D]
    args_mb = _split(args, M)
    stage_ids = jnp.arange(S)

    def one_stage(params, x, s, k):
        r = jnp.clip(k // M, 0, R - 1)
        m = jnp.mod(k, M)
        if not shared_units and R > 1:
            params = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, r, 0, False), params)
        elif not shared_units:
            params = jax.tree.map(lambda p: p[0], params)
        a = jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, m, 0, False), args_mb)
        return stage_fn(params, x, a, r * S + s, m)

    stages = jax.vmap(one_stage, in_axes=(param_axis, 0, 0, 0), spmd_axis_name=STAGE_AXIS)
    if schedule.remat_stage:
        stages = jax.checkpoint(stages, policy=jax.checkpoint_policies.nothing_saveable,
                                prevent_cse=False)

    def iteration(carry, t):
        state, buf, acc = carry                     # [S, mb, ...], [M, mb, ...], outputs
        k = t - stage_ids                           # the item each stage works on
        valid = (k >= 0) & (k < R * M)
        state = state.at[0].set(jax.lax.dynamic_index_in_dim(buf, jnp.mod(t, M), 0, False))
        state = constrain(state, ("stage", "batch", "length", "act_embed"))
        out, ys = stages(chunks, state, stage_ids, k)
        last = t - (S - 1)
        slot = jnp.mod(last, M)
        keep = (last >= 0) & (last < R * M)
        buf = jax.lax.dynamic_update_index_in_dim(
            buf, jnp.where(keep, out[S - 1], jax.lax.dynamic_index_in_dim(buf, slot, 0, False)),
            slot, 0)
        # Item k of stage s was in repeat k // M: its outputs go to chunk [s, r].
        onehot = (jax.nn.one_hot(jnp.clip(k // M, 0, R - 1), R) * valid[:, None])  # [S, R]
        acc = jax.tree.map(lambda a, y: a + jnp.einsum(
            "sr,s...->sr...", onehot, y.astype(a.dtype)), acc, _floats(ys))
        return (_ppermute_next(out, mesh) if S > 1 else out, buf, acc), None

    state0 = jnp.zeros((S,) + x_mb.shape[1:], x.dtype)
    y_shapes = jax.eval_shape(lambda: stages(chunks, state0, stage_ids, stage_ids)[1])
    acc0 = jax.tree.map(lambda y: jnp.zeros((S, R) + y.shape[1:], jnp.float32), _floats(y_shapes))
    (_, buf, acc), _ = jax.lax.scan(iteration, (state0, x_mb, acc0), jnp.arange(schedule.iterations))
    # [S, R, L, ...] -> [R, S, L, ...] -> [U, ...], the microbatches' mean.
    ys = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(units, *a.shape[3:]) / M, acc)
    return _merge(buf), ys


def _floats(tree):
    """The float leaves of a per-unit outputs tree (None when there are none)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: v for k, v in tree.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    return tree
