"""FLOP counts: hand-computed cases for the dense and the MoE stack."""
import ml_collections

from m6jax import flops


def _cfg(moe=None):
    c = ml_collections.ConfigDict(dict(emb_dim=4, mlp_dim=8, num_layers=2, vocab_size=10))
    if moe:
        c.moe = ml_collections.ConfigDict(moe)
    return c


def test_dense_train_flops_by_hand():
    # patches 2x3->4: 24; layers 2 x (4*16 + 2*32) x 5 tokens: 1280; head 3 x 10 x 4: 120;
    # attention 2 layers x 2 x 5 x 5 x 4: 400. Total x 6.
    assert flops.train_flops_per_sequence(_cfg(), 2, 3, 3) == 6 * (24 + 1280 + 120 + 400)


def test_moe_counts_activated_experts_and_router():
    moe = dict(num_experts=4, k=2, every=2)
    # per layer: attention 64 + (dense MLP 64 + MoE (2 x 64 + router 16)) / 2 = 168
    assert flops.matmul_params_per_layer(_cfg(moe)) == 64 + (64 + 144) / 2


def test_zero_experts_is_the_dense_count():
    assert flops.matmul_params_per_layer(_cfg(dict(num_experts=0, k=1, every=1))) == \
        flops.matmul_params_per_layer(_cfg())
