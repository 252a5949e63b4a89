"""One pre-LN transformer block and the scanned stack of them.

The stack's layer loop has two forms. Initialisation and KV-cache decoding use Flax's
`nn.scan`, which creates the stacked `layers` parameters. Training and evaluation on a
*streamed* stack (the offload plan stores its layer leaves as `Segments`, some in host
memory) run `scan_units`: a plain `jax.lax.scan` over each segment of units that applies
one Block functionally, bringing a host unit's weights onto the device inside the
rematerialised body, so only the unit being computed is resident (forward and backward;
its gradient goes back to host memory as the unit's backward ends, by the transpose of
that `device_put`). With a pipeline schedule (`m6jax.pipeline`, mesh.stage > 1) training
runs the same `scan_units` once per stage and iteration, over that stage's chunk of units.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m6jax import pipeline as pipeline_lib
from m6jax.model.attention import SelfAttention
from m6jax.model.sparse import pattern_from_config
from m6jax.model.layers import constrain, layer_norm
from m6jax.model.mlp import Mlp
from m6jax.model.moe import MoeMlp, moe_config

# Named remat policies: what a scanned layer keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Activation offload: what a policy would save is parked in host memory instead and
    # brought back for the backward pass (JAX's offload policies).
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
    "offload_layer_input": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}
# A streamed unit's device copy of its weights is never a residual of the backward pass
# (it is fetched again): with remat "none" everything else is still saved.
_NOT_THE_WEIGHTS = jax.checkpoint_policies.save_anything_except_these_names("streamed_weights")


@flax.struct.dataclass
class Segments:
    """A stacked leaf [units, ...] stored as consecutive runs of units (`parts`, each
    [n, ...]), each in device or host memory: how the offload plan keeps a granular stack."""
    parts: tuple


def is_segments(x) -> bool:
    return isinstance(x, Segments)


class Block(nn.Module):
    """[B, S, D] -> [B, S, D]: x + Attn(LN(x)), then + Mlp(LN(x)). Scan-compatible.

    With `use_moe` the Mlp is the MoE layer (`moe`); `route` = (token_ids i32 [B, S],
    modality i32 [B, S], valid bool [B, S]) feeds the hash / domain routers and keeps
    padding out of expert capacity. Returns (x, MoE metrics or None).

    With `decode` it returns (x, (keys, values) [B, S, H, Dh]) for the KV cache, and a
    one-token step reads this layer's cache `cached` ([B, L, H, Dh] each; see
    SelfAttention). `capacity_tokens` (decode) sets the MoE group size for capacity.
    """
    cfg: Any  # the config's `model` section
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_moe: bool = False
    training: bool = False
    decode: bool = False
    capacity_tokens: int = 0

    @nn.compact
    def __call__(self, x, mask, route=None, cached=None):
        cfg = self.cfg
        x = checkpoint_name(x, "layer_input")  # what remat "offload_layer_input" parks on the host
        h = layer_norm(self.dtype, "pre_attn_norm")(x)
        attn = SelfAttention(cfg.num_heads, cfg.emb_dim // cfg.num_heads, self.dtype,
                             cfg.dropout_rate, self.deterministic, self.decode,
                             sparse=pattern_from_config(cfg), name="attn")
        if self.decode:
            y, kv = attn(h, mask, cached)
        else:
            y = attn(h, mask)
        x = x + y
        h = layer_norm(self.dtype, "pre_mlp_norm")(x)
        metrics = None
        if self.use_moe:
            y, metrics = MoeMlp(cfg.moe, cfg.mlp_dim, cfg.mlp_activation, self.dtype,
                                cfg.dropout_rate, self.deterministic, self.training,
                                capacity_tokens=self.capacity_tokens, name="moe")(h, *route)
            x = x + y
        else:
            x = x + Mlp(cfg.mlp_dim, cfg.mlp_activation, self.dtype, cfg.dropout_rate,
                        self.deterministic, name="mlp")(h)
        x = constrain(x, ("batch", "length", "act_embed"))
        return (x, kv) if self.decode else (x, metrics)


class BlockGroup(nn.Module):
    """`moe.every` blocks, the last one MoE: the scanned unit of an MoE stack, so the
    scan stays over identical units. Returns (x, the MoE block's metrics); with
    `decode` (x, (keys, values) [B, every, S, H, Dh]), reading cached [B, every, L, H, Dh]."""
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    training: bool = False
    decode: bool = False
    capacity_tokens: int = 0

    @nn.compact
    def __call__(self, x, mask, route, cached=None):
        every = int(self.cfg.moe.every)
        kvs = []
        for i in range(every):
            layer_cache = None if cached is None else (cached[0][:, i], cached[1][:, i])
            x, out = Block(self.cfg, self.dtype, self.deterministic, i == every - 1,
                           self.training, self.decode, self.capacity_tokens,
                           name=f"block_{i}")(x, mask, route, layer_cache)
            kvs.append(out)
        if self.decode:
            return x, tuple(jnp.stack([kv[j] for kv in kvs], axis=1) for j in range(2))
        return x, out


class Stack(nn.Module):
    """`num_layers` blocks applied with `nn.scan` along a `layers` parameter axis.

    With `share_layers` the block parameters have no layer axis and every layer applies
    the same weights (the Pseudo giant of Pseudo-to-Real); activations and FLOPs are
    those of the full-depth model either way.

    With `decode` (KV-cache generation, see M6) it returns (x, (keys, values) [B,
    num_layers, S, H, Dh]) of this call for the cache; a step passes the cache
    `cached` ([B, num_layers, L, H, Dh] each), which the scan reads layer by layer (axis
    1: the batch stays the leading axis of every cache array). Shared or not, each layer
    has its own cache. Decoding never rematerialises (there is no backward pass).
    """
    cfg: Any
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    training: bool = False
    decode: bool = False
    capacity_tokens: int = 0   # decode: MoE capacity group size (0 = the call's length)
    pipeline: pipeline_lib.Schedule | None = None  # train/eval run it when it is active

    @nn.compact
    def __call__(self, x, mask, route=None, cached=None):
        """Returns (x, MoE metrics stacked over the scanned units, or None if dense)."""
        cfg = self.cfg
        moe = moe_config(cfg)
        length, block, args, every = cfg.num_layers, Block, (), 1
        ctor = (cfg, self.dtype, self.deterministic)
        if moe is not None:
            # The scanned unit holds `every` layers (the last MoE), so units are identical.
            every = int(moe.every)
            length, args = cfg.num_layers // every, (route,)
            if every > 1:
                block, ctor = BlockGroup, ctor + (self.training,)
            else:
                ctor = ctor + (True, self.training)   # Block(use_moe=True, training)
        elif self.decode:
            ctor = ctor + (False, self.training)      # Block(use_moe=False, training)
        in_axes = (nn.broadcast,) * (1 + len(args))
        if self.decode:
            ctor = ctor + (True, self.capacity_tokens)
            if cached is not None and every > 1:      # [B, units, every, L, H, Dh]
                cached = tuple(c.reshape(c.shape[0], length, every, *c.shape[2:]) for c in cached)
            args = (route, cached)
            in_axes = (nn.broadcast, nn.broadcast, nn.broadcast if cached is None else 1)
        if self._pipelined(x):
            return self._pipeline(block(*ctor, parent=None), length, x, (mask, *args))
        streamed = self._streamed_layers()
        if streamed is not None:
            return self._scan_units(block(*ctor, parent=None), streamed, x, (mask, *args))
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none" and not self.decode:
            block = nn.remat(block, policy=policy, prevent_cse=False)
        if cfg.share_layers:
            scan_kw = dict(variable_broadcast="params", split_rngs={"params": False})
        else:
            scan_kw = dict(variable_axes={"params": 0}, split_rngs={"params": True},
                           metadata_params={nn.PARTITION_NAME: "layers"})
        scanned = nn.scan(block, length=length, in_axes=in_axes, out_axes=1 if self.decode else 0,
                          split_rngs={**scan_kw.pop("split_rngs"), "dropout": True},
                          **scan_kw)
        x, out = scanned(*ctor, name="layers")(x, mask, *args)
        if self.decode and every > 1:                 # [B, units, every, S, ...] -> layers
            out = tuple(o.reshape(o.shape[0], cfg.num_layers, *o.shape[3:]) for o in out)
        return x, out

    def _pipelined(self, x) -> bool:
        """Training and evaluation run the schedule (a plain scan over stage-sharded
        layers would gather the whole stack onto every device); decoding does not."""
        return (self.pipeline is not None and self.pipeline.active and not self.decode
                and not self.is_initializing() and x.shape[0] % self.pipeline.microbatches == 0)

    def _pipeline(self, unit, units, x, args):
        """The stack as `self.pipeline`'s schedule: each stage runs `scan_units` on its chunk."""
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        layers = self.variables["params"]["layers"]
        shared = bool(self.cfg.share_layers)
        chunk_units = units // (self.pipeline.stages * self.pipeline.repeats)

        def stage_fn(params, x, args, chunk, microbatch):
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, microbatch),
                                                              chunk)
            stacked = params if shared else jax.tree.map(lambda p: Segments((p,)), params)
            x, ys, _ = scan_units(unit, stacked, x, args, self.cfg.remat_policy, key,
                                  shared_units=chunk_units if shared else 0)
            return x, ys

        return pipeline_lib.run(stage_fn, layers, x, args, self.pipeline, constrain,
                                shared_units=units if shared else 0)

    def _streamed_layers(self):
        """The stacked block params if the offload plan stores them as `Segments`."""
        if self.is_initializing() or self.decode or self.cfg.share_layers:
            return None
        layers = self.variables.get("params", {}).get("layers")
        leaves = jax.tree.leaves(layers, is_leaf=is_segments)
        if not leaves or not all(is_segments(s) for s in leaves):
            return None
        return layers

    def _scan_units(self, unit, layers, x, args):
        """`scan_units` over every segment in turn, with this stack's rngs and sows."""
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        sow = self.is_mutable_collection("intermediates")
        x, ys, inter = scan_units(unit, layers, x, args, self.cfg.remat_policy, rng, sow)
        if sow and inter:
            self.put_variable("intermediates", "layers", inter)
        return x, ys


def on_host(x) -> bool:
    """Inside jit: whether `x` lives in host memory (its aval's memory space)."""
    return jax.typeof(x).memory_space == jax.memory.Space.Host


def fetch(x):
    """An array in host memory -> its device copy; device arrays pass through."""
    return jax.device_put(x, jax.memory.Space.Device) if on_host(x) else x


def _to_device(w):
    """A unit's weight -> its device copy, named so that it is never saved for the
    backward pass (which fetches it again)."""
    return checkpoint_name(fetch(w), "streamed_weights") if on_host(w) else w


def scan_units(unit: nn.Module, layers, x, args, remat_policy: str, rng=None, sow=False,
               shared_units: int = 0):
    """Applies the scanned unit (a Block or BlockGroup) once per unit of `layers`.

    layers: the stack's params, each leaf `Segments` of [n_i, ...] parts (the same runs
    for every leaf), or with `shared_units` = n one unit's params applied n times (a
    Pseudo stack). x: [B, S, D]; args: what each unit takes after x (mask, route...).
    A unit in host memory is copied to the device inside its rematerialised body, so
    the forward and the recomputed backward hold one unit's weights at a time.
    Returns (x, per-unit outputs stacked along axis 0, sown intermediates or {}).
    """
    policy = REMAT_POLICIES[remat_policy] or _NOT_THE_WEIGHTS

    def apply_unit(x, params, index, args):
        params = jax.tree.map(_to_device, params)
        rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, index)}
        if sow:
            out, state = unit.apply({"params": params}, x, *args, rngs=rngs,
                                    mutable=["intermediates"])
            return out, state.get("intermediates", {})
        return unit.apply({"params": params}, x, *args, rngs=rngs), {}

    apply_unit = jax.checkpoint(apply_unit, policy=policy, prevent_cse=False)

    def body(x, xs):
        params, index = xs
        (x, out), inter = apply_unit(x, params, index, args)
        return x, (out, inter)

    if shared_units:
        x, (out, inter) = jax.lax.scan(lambda x, i: body(x, (layers, i)), x,
                                       jnp.arange(shared_units))
        return x, out, inter
    num_parts = len(jax.tree.leaves(layers, is_leaf=is_segments)[0].parts)
    start, ys = 0, []
    for i in range(num_parts):
        part = jax.tree.map(lambda s: s.parts[i], layers, is_leaf=is_segments)
        n = jax.tree.leaves(part)[0].shape[0]
        x, y = jax.lax.scan(body, x, (part, jnp.arange(start, start + n)))
        ys.append(y)
        start += n
    out, inter = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *ys) if len(ys) > 1 else ys[0]
    return x, out, inter
