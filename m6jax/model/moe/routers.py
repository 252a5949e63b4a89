"""Routers: tokens -> routing instructions (which experts, with what combine weight).

A router never moves tokens. It returns `Routing`: for every token and each of its `k`
choices an expert index and a combine weight, plus its auxiliary losses and the
probabilities the metrics need. The dispatch code (dispatch.py) consumes it, so a new
router is one small function. All router math is float32 whatever the compute dtype:
softmax over bfloat16 logits makes near-ties flip between meshes and steps.

Shapes: G groups (one per example), S tokens per group, E experts, K choices per token.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ROUTERS = ("topk", "prototype", "hash", "domain")
NUM_DOMAINS = 2  # image, text


class Routing(NamedTuple):
    expert_index: jax.Array    # i32 [G, S, K]: expert of each choice
    combine_weight: jax.Array  # f32 [G, S, K]: weight of that expert's output
    probs: jax.Array           # f32 [G, S, E]: router probabilities (metrics; 0 for hash)
    balance_loss: jax.Array    # f32 []: Switch load-balancing loss (1.0 when uniform)
    z_loss: jax.Array          # f32 []: ST-MoE router z-loss


def _token_mean(t, valid):
    """Mean over the [G, S] token axes of t [G, S, ...], over valid tokens only."""
    if valid is None:
        return t.mean(axis=(0, 1))
    v = valid.astype(jnp.float32).reshape(valid.shape + (1,) * (t.ndim - 2))
    return jnp.sum(t * v, axis=(0, 1)) / jnp.maximum(jnp.sum(valid), 1.0)


def _balance(probs, expert_index, num_experts, valid=None):
    """Switch loss E * sum_e f_e * P_e: f_e = share of tokens sending a choice to expert
    e, P_e = mean router probability of e. Uniform routing gives K (top-K) / 1.
    Padding (valid False) is left out: it would otherwise be balanced instead."""
    chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32).max(axis=-2)
    f = _token_mean(chosen, valid)                                       # [E]
    p = _token_mean(probs, valid)                                        # [E]
    return num_experts * jnp.sum(f * p)


def _z_loss(logits, valid=None):
    """mean over tokens (and router groups) of logsumexp(logits)^2 (Zoph et al. 2022)."""
    return jnp.mean(_token_mean(jax.nn.logsumexp(logits, axis=-1) ** 2, valid))


def topk_router(logits, k: int, valid=None) -> Routing:
    """Token-choice top-k over all E experts: k=1 is Switch, k=2 GShard-style top-2.

    logits: f32 [G, S, E]. For k > 1 the chosen probabilities are renormalised to sum
    to 1 (GShard); for k = 1 the weight is the raw probability (Switch), which is what
    lets the router learn through the combine.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    weight, index = jax.lax.top_k(probs, k)                              # [G, S, K]
    if k > 1:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return Routing(index.astype(jnp.int32), weight, probs,
                   _balance(probs, index, logits.shape[-1], valid), _z_loss(logits, valid))


def prototype_router(logits, k: int, valid=None) -> Routing:
    """Expert prototyping, "k top-1" (M6-T): the E experts form k prototypes of E/k;
    each token goes top-1 inside every prototype and the k outputs are summed.

    logits: f32 [G, S, E] with expert e in prototype e // (E/k). Balance and z losses
    are taken per prototype and averaged, so uniform routing again gives 1.
    """
    g, s, e = logits.shape
    per = e // k
    lg = logits.reshape(g, s, k, per)                                    # [G, S, K, E/K]
    probs = jax.nn.softmax(lg, axis=-1)
    local = jnp.argmax(probs, axis=-1)                                   # [G, S, K]
    weight = jnp.take_along_axis(probs, local[..., None], axis=-1)[..., 0]
    index = (local + per * jnp.arange(k)[None, None, :]).astype(jnp.int32)
    balance = jnp.mean(jax.vmap(lambda p, i: _balance(p, i[..., None], per, valid),
                                in_axes=(2, 2))(probs, local))
    return Routing(index, weight, probs.reshape(g, s, e) / k, balance, _z_loss(lg, valid))


def hash_expert(token_ids, num_experts: int):
    """Fixed token-id -> expert map (Roller et al. 2021): a multiplicative hash, the
    same on every host, step and run. Image patches pass negative ids (by position)."""
    h = token_ids.astype(jnp.uint32) * jnp.uint32(2654435761)           # Knuth's constant
    h = h ^ (h >> 16)
    return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_router(token_ids, num_experts: int) -> Routing:
    """token_ids: i32 [G, S] -> one expert per token, weight 1; nothing to learn, no loss."""
    index = hash_expert(token_ids, num_experts)[..., None]              # [G, S, 1]
    g, s = token_ids.shape
    zero = jnp.zeros((), jnp.float32)
    return Routing(index, jnp.ones((g, s, 1), jnp.float32),
                   jnp.zeros((g, s, num_experts), jnp.float32), zero, zero)


def domain_router(logits, modality, valid=None) -> Routing:
    """DEMix-style: the E experts form one group per modality (image: first E/2, text:
    the rest); a token routes top-1 inside its modality's group only.

    logits: f32 [G, S, E]; modality: i32 [G, S] (0 = image, 1 = text).
    """
    e = logits.shape[-1]
    per = e // NUM_DOMAINS
    allowed = (jnp.arange(e)[None, None, :] // per) == modality[..., None]
    masked = jnp.where(allowed, logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)                              # 0 outside the group
    weight, index = jax.lax.top_k(probs, 1)
    lg = logits.reshape(*logits.shape[:2], NUM_DOMAINS, per)
    own = jnp.take_along_axis(lg, modality[..., None, None], axis=2)[:, :, 0]  # [G, S, E/2]
    return Routing(index.astype(jnp.int32), weight, probs, _balance(probs, index, e, valid),
                   _z_loss(own, valid))
