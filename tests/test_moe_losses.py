"""Router auxiliary losses against hand-computed values."""
import math

import jax.numpy as jnp
import numpy as np

from m6jax.model.moe import routers

L3 = math.log(3.0)


def test_switch_balance_and_z_loss_by_hand():
    # probs: [.25, .75], [.25, .75], [.75, .25] -> top-1 experts 1, 1, 0.
    logits = jnp.array([[[0.0, L3], [0.0, L3], [L3, 0.0]]], jnp.float32)
    r = routers.topk_router(logits, 1)
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [1, 1, 0])
    # f = [1/3, 2/3], P = [5/12, 7/12]; E * sum f P = 2 * (5/36 + 14/36) = 19/18.
    np.testing.assert_allclose(r.balance_loss, 19 / 18, rtol=1e-6)
    np.testing.assert_allclose(r.z_loss, math.log(4.0) ** 2, rtol=1e-6)  # lse = ln 4 for all
    np.testing.assert_allclose(r.combine_weight[0, :, 0], [0.75, 0.75, 0.75], rtol=1e-6)


def test_uniform_routing_gives_balance_loss_one():
    idx = jnp.tile(jnp.arange(4), 4).reshape(1, 16, 1)   # every expert chosen 4 times
    probs = jnp.full((1, 16, 4), 0.25)
    np.testing.assert_allclose(routers._balance(probs, idx, 4), 1.0, rtol=1e-6)


def test_prototype_losses_are_per_prototype_by_hand():
    # E = 4, k = 2: prototype 0 = experts {0, 1} (probs .25/.75), prototype 1 = {2, 3}.
    logits = jnp.array([[[0.0, L3, L3, 0.0]]], jnp.float32)
    r = routers.prototype_router(logits, 2)
    np.testing.assert_array_equal(r.expert_index[0, 0], [1, 2])
    np.testing.assert_allclose(r.combine_weight[0, 0], [0.75, 0.75], rtol=1e-6)
    # each prototype: f = one-hot of its choice, P = (.25, .75): 2 * .75 = 1.5
    np.testing.assert_allclose(r.balance_loss, 1.5, rtol=1e-6)
    np.testing.assert_allclose(r.z_loss, math.log(4.0) ** 2, rtol=1e-6)


def test_domain_router_keeps_each_modality_in_its_half():
    logits = jnp.array([[[5.0, 0.0, 1.0, 0.0], [5.0, 0.0, 1.0, 0.0]]], jnp.float32)
    r = routers.domain_router(logits, jnp.array([[0, 1]], jnp.int32))
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 2])
    np.testing.assert_allclose(r.probs[0, 1, :2], 0.0)


def test_padding_is_left_out_of_the_balance_loss():
    # Token 2 (padding) would tip the balance; without it f = [0, 1], P = [.25, .75].
    logits = jnp.array([[[0.0, L3], [0.0, L3], [L3, 0.0]]], jnp.float32)
    r = routers.topk_router(logits, 1, valid=jnp.array([[True, True, False]]))
    np.testing.assert_allclose(r.balance_loss, 2 * 0.75, rtol=1e-6)
