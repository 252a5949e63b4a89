"""The MoE layer against a per-token reference: routing, capacity, dropless, gradients."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from m6jax.model.moe import MoeMlp
from m6jax.model.moe import dispatch as dsp
from m6jax.model.moe.routers import hash_expert

G, S, D, M, E = 3, 10, 8, 16, 8


def moe_cfg(**kw):
    base = dict(num_experts=E, router="topk", k=1, every=1, capacity_factor=100.0,
                eval_capacity_factor=100.0, aux_loss_weight=0.01, z_loss_weight=0.0,
                jitter=0.0, dispatch="gather")
    return ml_collections.ConfigDict({**base, **kw})


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(G, S, D)).astype(np.float32)
    ids = rng.integers(0, 50, size=(G, S)).astype(np.int32)
    modality = (np.arange(S)[None, :] >= 4).repeat(G, 0).astype(np.int32)
    return x, ids, modality


def run(cfg, x, ids, modality, params=None):
    layer = MoeMlp(cfg, M, activation="relu")
    if params is None:
        params = layer.init(jax.random.key(1), x, ids, modality)["params"]
        params = jax.tree.map(lambda b: getattr(b, "value", b), params,
                              is_leaf=lambda b: hasattr(b, "value"))
    y, metrics = layer.apply({"params": params}, x, ids, modality)
    return params, np.asarray(y), jax.device_get(metrics)


def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def reference_choices(cfg, p, xt, tid, mod):
    """(expert, weight) pairs of one token, computed the obvious way."""
    if cfg.router == "hash":
        return [(int(hash_expert(jnp.int32(tid), E)), 1.0)]
    probs = softmax(xt.astype(np.float64) @ np.asarray(p["router"], np.float64))
    if cfg.router == "topk":
        top = list(np.argsort(-probs)[: cfg.k])
        w = probs[top] / (probs[top].sum() if cfg.k > 1 else 1.0)
        return list(zip(top, w))
    if cfg.router == "prototype":
        per = E // cfg.k
        out = []
        for j in range(cfg.k):
            q = softmax(np.log(probs[j * per:(j + 1) * per]))
            out.append((j * per + int(np.argmax(q)), q.max()))
        return out
    half = E // 2
    q = softmax(np.log(probs[mod * half:(mod + 1) * half]))
    return [(mod * half + int(np.argmax(q)), q.max())]


def reference_output(cfg, p, x, ids, modality):
    wi, wo = np.asarray(p["wi"], np.float64), np.asarray(p["wo"], np.float64)
    y = np.zeros(x.shape)
    for g in range(G):
        for s in range(S):
            for e, w in reference_choices(cfg, p, x[g, s], ids[g, s], modality[g, s]):
                y[g, s] += w * (np.maximum(x[g, s] @ wi[e], 0) @ wo[e])
    return y


ROUTER_CASES = [("topk", 1), ("topk", 2), ("prototype", 2), ("prototype", 4), ("hash", 1),
                ("domain", 1)]


@pytest.mark.parametrize("dispatch", ["gather", "einsum", "dropless"])
@pytest.mark.parametrize("router, k", ROUTER_CASES, ids=lambda v: str(v))
def test_layer_matches_per_token_reference_when_nothing_dropped(router, k, dispatch):
    cfg = moe_cfg(router=router, k=k, dispatch=dispatch)
    x, ids, modality = inputs()
    p, y, metrics = run(cfg, x, ids, modality)
    np.testing.assert_allclose(y, reference_output(cfg, p, x, ids, modality), atol=1e-4, rtol=1e-4)
    assert metrics["dropped_fraction"] == 0.0


def test_over_capacity_tokens_pass_through_as_zero():
    # Hash routing fixes the assignment: ids 0 and 5 both hash to expert 0, 1 to 6.
    cfg = moe_cfg(router="hash", eval_capacity_factor=1.0)   # C = ceil(10 * 1 / 8) = 2
    ids1 = np.array([0, 5, 0, 1, 0, 5, 1, 2, 3, 4], np.int32)
    np.testing.assert_array_equal(hash_expert(jnp.asarray(ids1), E), [0, 0, 0, 6, 0, 0, 6, 4, 5, 1])
    # Expert 0 is asked by tokens 0, 1, 2, 4, 5 and keeps the first two: 2, 4, 5 drop.
    dropped = np.isin(np.arange(S), [2, 4, 5])
    x, _, modality = inputs()
    ids = np.tile(ids1, (G, 1))
    p, y, metrics = run(cfg, x, ids, modality)
    full = reference_output(moe_cfg(router="hash"), p, x, ids, modality)
    np.testing.assert_array_equal(y[:, dropped], 0.0)
    np.testing.assert_allclose(y[:, ~dropped], full[:, ~dropped], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(metrics["dropped_fraction"], 3 / 10, rtol=1e-6)


def test_slots_serve_first_choices_before_second_choices():
    # 3 tokens, top-2, 2 experts, capacity 2: the three first choices all pick expert 0.
    idx = jnp.array([[[0, 1], [0, 1], [0, 1]]], jnp.int32)
    routing = dsp.Routing(idx, jnp.ones((1, 3, 2)), None, 0.0, 0.0)
    slots = dsp.assign_slots(routing, 2, 2)
    np.testing.assert_array_equal(slots.position[0], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(slots.kept[0], [[True, True], [True, True], [False, False]])


@pytest.mark.parametrize("router, k", [("topk", 1), ("topk", 2), ("prototype", 2)])
def test_dropless_equals_capacity_path_when_nothing_dropped(router, k):
    x, ids, modality = inputs(seed=3)
    p, y_cap, _ = run(moe_cfg(router=router, k=k), x, ids, modality)
    _, y_drop, _ = run(moe_cfg(router=router, k=k, dispatch="dropless"), x, ids, modality, p)
    np.testing.assert_allclose(y_drop, y_cap, atol=1e-5, rtol=1e-5)


def test_gradients_reach_router_and_every_used_expert():
    cfg = moe_cfg(router="topk", k=2, capacity_factor=1.0)
    x, ids, modality = inputs()
    p, _, _ = run(cfg, x, ids, modality)
    layer = MoeMlp(cfg, M, activation="relu")

    def loss(params):
        y, m = layer.apply({"params": params}, x, ids, modality)
        return jnp.sum(y ** 2) + m["balance_loss"]

    grads = jax.grad(loss)(p)
    assert np.abs(grads["router"]).max() > 0
    _, m = layer.apply({"params": p}, x, ids, modality)
    chosen = np.zeros(E, bool)
    chosen[np.unique(np.asarray(m["expert_index"]))] = True  # capacity >= 1: each keeps a token
    used = np.abs(np.asarray(grads["wo"])).reshape(E, -1).max(-1) > 0
    np.testing.assert_array_equal(used, chosen)  # exactly the chosen experts learn


def _knuth_hash(token_id: int, num_experts: int) -> int:
    """The hash written out with Python integers (ids as uint32, two's complement)."""
    h = ((token_id % 2**32) * 2654435761) % 2**32
    return (h ^ (h >> 16)) % num_experts


def test_hash_routing_is_the_multiplicative_hash_and_ignores_the_input():
    cfg = moe_cfg(router="hash")
    x, ids, modality = inputs()
    probe = np.array([0, 1, 2, 7, 49, 1000, 2**31 - 1, -1, -16], np.int32)  # < 0: image patches
    np.testing.assert_array_equal(np.asarray(hash_expert(jnp.asarray(probe), E)),
                                  [_knuth_hash(int(t), E) for t in probe])
    np.testing.assert_array_equal(np.asarray(hash_expert(jnp.asarray(ids), E)),
                                  [[_knuth_hash(int(t), E) for t in row] for row in ids])
    p, _, m1 = run(cfg, x, ids, modality)
    _, _, m2 = run(cfg, x * 3 + 1, ids, modality, p)
    np.testing.assert_array_equal(m1["load"], m2["load"])


def test_capacity_formula():
    assert dsp.expert_capacity(10, 1, 8, 1.0) == 2
    assert dsp.expert_capacity(28, 2, 8, 1.25) == math.ceil(28 * 2 * 1.25 / 8)
    assert dsp.expert_capacity(1, 1, 64, 1.0) == 1


def test_training_uses_capacity_factor_and_eval_the_eval_factor():
    cfg = moe_cfg(router="hash", capacity_factor=1.0, eval_capacity_factor=8.0)
    x, _, modality = inputs()
    ids = np.tile(np.array([0, 5, 0, 1, 0, 5, 1, 2, 3, 4], np.int32), (G, 1))
    p, _, m_eval = run(cfg, x, ids, modality)
    _, m_train = MoeMlp(cfg, M, activation="relu", training=True).apply(
        {"params": p}, x, ids, modality)
    assert m_eval["dropped_fraction"] == 0.0
    np.testing.assert_allclose(m_train["dropped_fraction"], 0.3, rtol=1e-6)


@pytest.mark.parametrize("router, k", [("topk", 2), ("prototype", 2), ("domain", 1)],
                         ids=lambda v: str(v))
def test_sown_expert_index_is_each_tokens_choice_and_sums_to_load(router, k):
    cfg = moe_cfg(router=router, k=k)
    x, ids, modality = inputs()
    p, _, metrics = run(cfg, x, ids, modality)
    index = metrics["expert_index"]
    assert index.shape == (G, S, k) and index.dtype == np.int32
    for g in range(G):
        for s in range(S):
            ref = [e for e, _ in reference_choices(cfg, p, x[g, s], ids[g, s], modality[g, s])]
            assert sorted(index[g, s].tolist()) == sorted(int(e) for e in ref)
    np.testing.assert_allclose(np.bincount(index.ravel(), minlength=E) / index.size,
                               metrics["load"], rtol=1e-6)


def test_model_sows_expert_index_per_moe_layer_over_patches_then_text():
    import flax.linen as nn
    from configs.m6_moe import moe_section
    from helpers import GRID, TEXT_LEN, synthetic_batch, tiny_config
    from m6jax import sharding
    from m6jax.model import M6
    c = tiny_config()
    c.model.num_layers = 4
    c.model.moe = moe_section(num_experts=4, k=2, every=2)
    model, batch = M6(c.model, GRID, TEXT_LEN), synthetic_batch(4)
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        params = model.init(jax.random.key(0), batch)["params"]
        _, inter = model.apply({"params": params}, batch, mutable=["intermediates"])
    (m,) = inter["intermediates"]["moe"]
    assert m["expert_index"].shape == (2, 4, GRID * GRID + TEXT_LEN, 2)   # [L / every, B, P + T, K]
    assert int(m["expert_index"].min()) >= 0 and int(m["expert_index"].max()) < 4
