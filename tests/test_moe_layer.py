"""The MoE layer against a per-token reference: routing, capacity, dropless, gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax import schema
from m6jax.model.moe import MoeMlp
from m6jax.model.moe import dispatch as dsp
from m6jax.model.moe.routers import hash_expert

G, S, D, M, E = 3, 10, 8, 16, 8


def moe_cfg(**kw):
    base = dict(num_experts=E, router="topk", k=1, every=1, capacity_factor=100.0,
                eval_capacity_factor=100.0, aux_loss_weight=0.01, z_loss_weight=0.0,
                jitter=0.0, dispatch="gather", group_size=0, priority="order")
    return schema.moe_section(**{**base, **kw})


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


def reference_with_capacity(cfg, p, x, ids, modality, capacity_factor):
    """The layer with capacity, group_size and priority, one choice at a time in float64:
    groups of group_size consecutive tokens (flattened over examples), queues choice-major,
    within a choice rank by token order or by descending router probability."""
    wi, wo = np.asarray(p["wi"], np.float64), np.asarray(p["wo"], np.float64)
    flat_x, flat_ids, flat_mod = x.reshape(G * S, D), ids.reshape(-1), modality.reshape(-1)
    gs = cfg.group_size or S
    y = np.zeros((G * S, D))
    dropped = 0
    for g0 in range(0, G * S, gs):
        toks = range(g0, g0 + gs)
        choices = {t: reference_choices(cfg, p, flat_x[t], flat_ids[t], flat_mod[t]) for t in toks}
        k = len(choices[g0])
        cap = math.ceil(gs * k * capacity_factor / E)
        used = np.zeros(E, int)
        for j in range(k):
            queue = list(toks)
            if cfg.priority == "score":  # router probability of the choice; hash: all 0
                def prob(t):
                    if cfg.router == "hash":
                        return 0.0
                    return reference_probs(cfg, p, flat_x[t], flat_mod[t])[choices[t][j][0]]
                queue.sort(key=lambda t: -prob(t))
            for t in queue:
                e, w = choices[t][j]
                if used[e] < cap:
                    used[e] += 1
                    y[t] += w * (np.maximum(flat_x[t] @ wi[e], 0) @ wo[e])
                else:
                    dropped += 1
    return y.reshape(G, S, D), dropped / (G * S * k)


def reference_probs(cfg, p, xt, mod):
    """The router probability the layer ranks by (per prototype / domain for those)."""
    probs = softmax(xt.astype(np.float64) @ np.asarray(p["router"], np.float64))
    if cfg.router == "prototype":
        per = E // cfg.k
        return np.concatenate([softmax(np.log(probs[j * per:(j + 1) * per])) / cfg.k
                               for j in range(cfg.k)])
    if cfg.router == "domain":
        half, out = E // 2, np.zeros(E)
        out[mod * half:(mod + 1) * half] = softmax(np.log(probs[mod * half:(mod + 1) * half]))
        return out
    return probs


ROUTER_CASES = [("topk", 1), ("topk", 2), ("prototype", 2), ("prototype", 4), ("hash", 1),
                ("domain", 1)]


@pytest.mark.parametrize("dispatch", ["gather", "einsum", "grouped", "blocked", "ragged_dot"])
@pytest.mark.parametrize("router, k", ROUTER_CASES, ids=lambda v: str(v))
def test_layer_matches_per_token_reference_when_nothing_dropped(router, k, dispatch):
    cfg = moe_cfg(router=router, k=k, dispatch=dispatch)
    x, ids, modality = inputs()
    p, y, metrics = run(cfg, x, ids, modality)
    np.testing.assert_allclose(y, reference_output(cfg, p, x, ids, modality), atol=1e-4, rtol=1e-4)
    assert metrics["dropped_fraction"] == 0.0


@pytest.mark.parametrize("dispatch", ["gather", "grouped",
                                      pytest.param("einsum", marks=pytest.mark.slow)])
@pytest.mark.parametrize("router, k", ROUTER_CASES, ids=lambda v: str(v))
def test_groups_and_score_priority_match_the_reference_with_drops(router, k, dispatch):
    # Groups of 15 tokens span examples (S = 10); capacity 0.5 drops about half.
    cfg = moe_cfg(router=router, k=k, dispatch=dispatch, group_size=15, priority="score",
                  eval_capacity_factor=0.5)
    x, ids, modality = inputs(seed=5)
    p, y, metrics = run(cfg, x, ids, modality)
    ref, dropped = reference_with_capacity(cfg, p, x, ids, modality, 0.5)
    assert dropped > 0.2
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(metrics["dropped_fraction"], dropped, rtol=1e-5)


def test_capacity_dispatch_runs_the_backends_capacity_path():
    """dispatch='capacity' traces to the very program of 'grouped' on CPU and of 'gather'
    when lowering for CUDA (the table in m6jax/kernels.py)."""
    from m6jax import kernels
    x, ids, modality = inputs()

    def text(dispatch):
        layer = MoeMlp(moe_cfg(dispatch=dispatch), M, activation="relu")
        p = layer.init(jax.random.key(0), x, ids, modality)
        return jax.jit(lambda p: layer.apply(p, x, ids, modality)[0]).lower(p).as_text()
    assert text("capacity") == text("grouped") != text("gather")
    with kernels.lowering_for("cuda"):
        assert text("capacity") == text("gather")


def test_score_priority_keeps_the_most_confident_tokens():
    # One expert, capacity 2, probabilities 0.2, 0.9, 0.5: order keeps tokens 0 and 1,
    # score keeps 1 and 2.
    idx = jnp.zeros((1, 3, 1), jnp.int32)
    probs = jnp.array([[[0.2], [0.9], [0.5]]])
    routing = dsp.Routing(idx, jnp.ones((1, 3, 1)), probs, 0.0, 0.0)
    np.testing.assert_array_equal(dsp.assign_slots(routing, 1, 2, priority="order").kept[0, :, 0],
                                  [True, True, False])
    np.testing.assert_array_equal(dsp.assign_slots(routing, 1, 2, priority="score").kept[0, :, 0],
                                  [False, True, True])


def test_group_size_spanning_examples_pools_their_capacity():
    # Hash routing fixes the assignment; one group of all 3 examples (C = 4) pools the
    # examples' slots, so which choices drop differs from one example per group (C = 2).
    x, _, modality = inputs()
    row0 = np.array([0, 5, 0, 1, 0, 5, 1, 2, 3, 4], np.int32)    # experts 0,0,0,6,0,0,6,4,5,1
    row1 = np.array([2, 3, 4, 2, 3, 4, 2, 3, 4, 2], np.int32)    # experts 4, 5, 1: never 0
    ids = np.stack([row0, row1, row1])
    cfg_g = moe_cfg(router="hash", eval_capacity_factor=1.0, group_size=G * S)
    p, _, m_one = run(moe_cfg(router="hash", eval_capacity_factor=1.0), x, ids, modality)
    _, _, m_pool = run(cfg_g, x, ids, modality, p)
    ref_one = reference_with_capacity(moe_cfg(router="hash"), p, x, ids, modality, 1.0)[1]
    ref_pool = reference_with_capacity(cfg_g, p, x, ids, modality, 1.0)[1]
    np.testing.assert_allclose(m_one["dropped_fraction"], ref_one, rtol=1e-6)
    np.testing.assert_allclose(m_pool["dropped_fraction"], ref_pool, rtol=1e-6)
    assert ref_pool != ref_one and ref_one > 0


def test_dropless_default_is_chosen_per_backend():
    from m6jax.model.moe.layer import dropless_impl
    from m6jax import kernels
    assert dropless_impl("dropless") == "blocked"                     # this CPU
    with kernels.lowering_for("cuda"):  # not jax.lax.ragged_dot: a padded dense matmul there
        assert dropless_impl("dropless", "", "bfloat16") == "mgpu"   # Hopper's Mosaic GPU kernel
        assert dropless_impl("dropless", "", "float32") == "blocked"  # WGMMA: 16-bit only
    with kernels.lowering_for("tpu"):
        assert dropless_impl("dropless") == "megablox"
        assert dropless_impl("dropless", "gmm=ragged_dot") == "ragged_dot"
    assert dropless_impl("ragged_dot") == "ragged_dot"


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


@pytest.mark.parametrize("dispatch", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("router, k", [("topk", 1), ("topk", 2), ("prototype", 2)])
def test_dropless_equals_capacity_path_when_nothing_dropped(router, k, dispatch):
    x, ids, modality = inputs(seed=3)
    p, y_cap, _ = run(moe_cfg(router=router, k=k), x, ids, modality)
    _, y_drop, _ = run(moe_cfg(router=router, k=k, dispatch=dispatch), x, ids, modality, p)
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
