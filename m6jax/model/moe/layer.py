"""The MoE feed-forward layer: router -> dispatch -> experts (batched matmul) -> combine."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax import kernels
from m6jax.model.layers import constrain
from m6jax.model.mlp import ACTIVATIONS
from m6jax.model.moe import dispatch as dsp
from m6jax.model.moe import parallel, routers

# `dropless` is the backend's dropless kernel from m6jax/kernels.py's table (`gmm`):
# `blocked` on CPU (measured, BENCHMARKS.md), jax's Mosaic GPU ragged dot on a Hopper GPU
# (16-bit models; `blocked` otherwise), megablox's Pallas gmm on TPU.
DISPATCHES = ("capacity", "gather", "einsum", "grouped", "dropless", "blocked", "ragged_dot",
              "megablox", "mgpu")
DROPLESS = ("dropless", "blocked", "ragged_dot", "megablox", "mgpu")


def capacity_impl(dispatch: str, overrides: str = "") -> str:
    """The capacity path a `model.moe.dispatch` value runs: `capacity` is the backend's
    (m6jax/kernels.py: grouped on CPU, gather on GPU/TPU; the same choices drop in all)."""
    return kernels.resolve("capacity", overrides) if dispatch == "capacity" else dispatch


def dropless_impl(dispatch: str, overrides: str = "", dtype=jnp.bfloat16) -> str:
    """The dropless implementation a `model.moe.dispatch` value runs on this platform
    (`overrides`: model.kernels) for experts computing in `dtype`."""
    impl = kernels.resolve("gmm", overrides) if dispatch == "dropless" else dispatch
    if impl == "mgpu" and jnp.dtype(dtype).itemsize != 2:
        # Hopper's WGMMA takes 16-bit operands for these kernels.
        if dispatch == "mgpu" or kernels.parse(overrides).get("gmm") == "mgpu":
            raise ValueError(f"the mgpu grouped matmul takes 16-bit operands, not "
                             f"{jnp.dtype(dtype)}: set model.dtype=bfloat16 or "
                             "model.moe.dispatch=blocked")
        return "blocked"
    return impl


def group_shape(batch: int, length: int, group_size: int) -> tuple[int, int]:
    """(groups, tokens per group) of a [batch, length] call: `group_size` consecutive
    tokens of consecutive examples, or one example per group (group_size 0, or a call
    whose token count it does not divide: generation batches)."""
    if group_size and (batch * length) % group_size == 0:
        return batch * length // group_size, group_size
    return batch, length

# Experts are a batch of independent [D, M] matmuls: fan-in is D (or M), not E * D.
_EXPERT_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1, batch_axis=(0,))


def moe_config(model_cfg):
    """The `model.moe` section if MoE is enabled (num_experts > 0), else None."""
    moe = model_cfg.get("moe") if hasattr(model_cfg, "get") else None
    return moe if moe is not None and int(moe.num_experts) > 0 else None


class MoeMlp(nn.Module):
    """[B, S, D] -> ([B, S, D], metrics): E expert MLPs, each token to K of them.

    Routing groups are `moe.group_size` consecutive tokens (0: one example per group);
    the config check keeps groups inside a device's tokens, so capacity and drops do not
    depend on how the batch is sharded. Over-capacity choices contribute zero (the block's
    residual carries the token). Metrics (scalars unless noted): `balance_loss`,
    `z_loss`, `dropped_fraction`, `router_entropy`, `load` f32 [E] (share of choices
    per expert, before capacity), `expert_index` i32 [B, S, K] (each token's chosen
    experts, for routing analyses; unused by the train step, so XLA drops it there).
    """
    moe: Any                    # the `model.moe` config section
    mlp_dim: int
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True
    training: bool = False      # picks capacity_factor vs eval_capacity_factor, jitter
    capacity_tokens: int = 0    # group size the capacity is computed for; 0 = S (decode: L)
    kernels: str = ""           # model.kernels: the dropless kernel's override (gmm=...)

    @nn.compact
    def __call__(self, x, token_ids=None, modality=None, valid=None):
        """x: [B, S, D]; token_ids i32 [B, S] (hash router); modality i32 [B, S] (domain);
        valid bool [B, S]: padding (False) takes no expert slot and gets output 0."""
        cfg = self.moe
        e, k, (b, s0, d) = int(cfg.num_experts), int(cfg.k), x.shape
        g, s = (b, s0) if self.capacity_tokens else group_shape(b, s0, int(cfg.group_size))
        regroup = (g, s) != (b, s0)
        x = x.astype(self.dtype)
        valid = jnp.ones((b, s0), bool) if valid is None else valid.astype(bool)
        if regroup:  # [B, S0, ...] -> [G, S, ...]
            x, valid, token_ids, modality = (
                None if a is None else a.reshape(g, s, *a.shape[2:])
                for a in (x, valid, token_ids, modality))
            x = constrain(x, ("batch", "length", "act_embed"))
        routing = self._route(x, token_ids, modality, valid, e, k)
        k = routing.expert_index.shape[-1]
        # Padding must not take capacity from real tokens: zero weight, no slot.
        routing = routing._replace(
            combine_weight=routing.combine_weight * valid[..., None].astype(jnp.float32))

        wi = self.param("wi", nn.with_logical_partitioning(_EXPERT_INIT, ("expert", "embed", "mlp")),
                        (e, d, self.mlp_dim))
        wo = self.param("wo", nn.with_logical_partitioning(_EXPERT_INIT, ("expert", "mlp", "embed")),
                        (e, self.mlp_dim, d))
        drop = nn.Dropout(self.dropout_rate)

        def hidden(h):
            return drop(ACTIVATIONS[self.activation](h), deterministic=self.deterministic)

        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        wi_c, wo_c = wi.astype(self.dtype), wo.astype(self.dtype)
        # Without dropout the hidden activation is a pure function the grouped matmuls
        # can fuse; with it (RNG) they run as two passes around `hidden`.
        pure = self.deterministic or not self.dropout_rate
        act = ACTIVATIONS[self.activation] if pure else hidden
        if cfg.dispatch in DROPLESS or not factor:
            impl = dropless_impl(cfg.dispatch if cfg.dispatch in DROPLESS else "dropless",
                                 self.kernels, self.dtype)
            y, sent = parallel.dropless(x, routing, wi_c, wo_c, act, impl, pure,
                                        float(cfg.peer_capacity_factor))
            kept = valid[..., None] & sent   # a peer block's overflow is dropped
        else:
            dispatch = capacity_impl(cfg.dispatch, self.kernels)
            cap = dsp.expert_capacity(self.capacity_tokens or s, k, e, float(factor))
            slots = dsp.assign_slots(routing, e, cap, valid, cfg.priority)
            kept = slots.kept
            if dispatch == "grouped":
                y = parallel.capacity_grouped(x, routing, kept, wi_c, wo_c, act, pure)
            else:
                y = _through_slots(x, routing, slots, cap, wi_c, wo_c, hidden, dispatch)
        metrics = self._metrics(routing, kept, valid, e)
        if regroup:
            y = y.reshape(b, s0, d)
            metrics["expert_index"] = metrics["expert_index"].reshape(b, s0, k)
        y = constrain(y.astype(self.dtype), ("batch", "length", "act_embed"))
        return y, metrics

    def _route(self, x, token_ids, modality, valid, e, k) -> routers.Routing:
        cfg = self.moe
        if cfg.router == "hash":
            if token_ids is None:
                raise ValueError("model.moe.router='hash' needs token_ids passed to the layer")
            return routers.hash_router(token_ids, e)
        xr = x.astype(jnp.float32)
        if self.training and cfg.jitter > 0:
            # Multiplicative input jitter (Switch): explores routing early in training.
            noise = jax.random.uniform(self.make_rng("dropout"), xr.shape, jnp.float32,
                                       1.0 - cfg.jitter, 1.0 + cfg.jitter)
            xr = xr * noise
        w = self.param("router", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", None)), (x.shape[-1], e), jnp.float32)
        logits = jnp.einsum("gsd,de->gse", xr, w)                        # f32 [G, S, E]
        if cfg.router == "topk":
            return routers.topk_router(logits, k, valid)
        if cfg.router == "prototype":
            return routers.prototype_router(logits, k, valid)
        if cfg.router == "domain":
            if modality is None:
                raise ValueError("model.moe.router='domain' needs modality passed to the layer")
            return routers.domain_router(logits, modality, valid)
        raise ValueError(f"model.moe.router={cfg.router!r} is not one of {routers.ROUTERS}")

    @staticmethod
    def _metrics(routing: routers.Routing, kept, valid, e) -> dict[str, jax.Array]:
        """Over real (valid) tokens only: padding would otherwise look like load."""
        v = valid.astype(jnp.float32)                                     # [G, S]
        onehot = jax.nn.one_hot(routing.expert_index, e, dtype=jnp.float32)
        counts = jnp.einsum("gske,gs->e", onehot, v)
        k = routing.expert_index.shape[-1]
        p = routing.probs
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
        n = jnp.maximum(jnp.sum(v), 1.0)
        return dict(balance_loss=routing.balance_loss, z_loss=routing.z_loss,
                    dropped_fraction=1.0 - jnp.sum(kept.astype(jnp.float32)) / (n * k),
                    router_entropy=jnp.sum(entropy * v) / n,
                    load=counts / jnp.maximum(jnp.sum(counts), 1.0),
                    expert_index=routing.expert_index)


def _through_slots(x, routing, slots, cap, wi, wo, hidden, dispatch: str):
    """x [G, S, D] -> [G, S, D] through the [G, E, C, D] slot buffer (`gather` or
    `einsum`), which moves to the experts' devices and back (parallel.py)."""
    e = wi.shape[0]
    if dispatch == "einsum":
        xe, combine = dsp.dispatch_einsum(x, routing, slots, e, cap)
    else:
        xe, flat = dsp.dispatch_gather(x, routing, slots, e, cap)
    ye = parallel.from_experts(_experts(parallel.to_experts(xe), wi, wo, hidden))
    if dispatch == "einsum":
        return dsp.combine_einsum(ye, combine)
    return dsp.combine_gather(ye, flat, routing.combine_weight)


def _experts(xe_gecd, wi, wo, hidden):
    """[G, E, C, D] -> [G, E, C, D]: each expert's MLP over its G*C slots.

    The matmuls run expert-major ([E, G*C, D]): with the slots split over two axes
    around the expert one, XLA:CPU transposed the backward's [G, E, C, M] operands and
    recomputed the activation's derivative in that copy (2x slower fwd+bwd, measured in
    BENCHMARKS.md, "CPU speed"). Only x and y (width D) are transposed here.
    """
    g, e, c, d = xe_gecd.shape
    x = jnp.swapaxes(xe_gecd, 0, 1).reshape(e, g * c, d)                # [E, G*C, D]
    h = hidden(jnp.einsum("end,edm->enm", x, wi))
    y = jnp.einsum("enm,emd->end", h, wo)
    return jnp.swapaxes(y.reshape(e, g, c, d), 0, 1)
