"""FLOP counts (hand-computed, dense and MoE) and the spec-sheet peaks the planner uses."""
import jax.numpy as jnp
import ml_collections
import pytest

from m6jax import flops


def _cfg(moe=None):
    c = ml_collections.ConfigDict(dict(emb_dim=4, mlp_dim=8, num_layers=2, vocab_size=10,
                                       attention="dense"))
    if moe:
        c.moe = ml_collections.ConfigDict(moe)
    return c


def test_dense_train_flops_by_hand():
    # patches 2x3->4: 24; layers 2 x (4*16 + 2*32) x 5 tokens: 1280; head 3 x 10 x 4: 120;
    # attention 2 layers x 2 x 5 x 5 x 4: 400. Total x 6.
    assert flops.train_flops_per_sequence(_cfg(), 2, 3, 3) == 6 * (24 + 1280 + 120 + 400)


def test_sparse_attention_counts_the_kept_blocks_pairs():
    # S = 8 in blocks of 2, window 0, no stride column, 1 global block: the 4 x 4 layout
    # keeps row 0 (4 blocks), column 0 (3 more) and the diagonal (3 more) = 10 blocks of
    # 2 x 2 = 40 pairs (dense: 64).
    c = _cfg()
    c.update(attention="sparse", sparse_block_size=2, sparse_window=0, sparse_stride=100,
             sparse_global_blocks=1)
    assert flops.attended_pairs(c, 8) == 40
    dense = flops.train_flops_per_sequence(_cfg(), 2, 3, 6)
    assert dense - flops.train_flops_per_sequence(c, 2, 3, 6) == 6 * 2 * 2 * (64 - 40) * 4
    from m6jax.model.sparse import Pattern  # the model's own layout agrees
    c.update(sparse_block_size=4, sparse_window=1, sparse_stride=3)
    assert flops.attended_pairs(c, 40) == Pattern(4, 1, 3, 1).mask(40).sum()


def test_accelerator_peak_fallback_times_a_large_matmul(monkeypatch):
    sizes = []
    monkeypatch.setattr(flops, "measure_peak_flops", lambda n=2048, **_: sizes.append(n) or 1.0)
    gpu = type("D", (), dict(platform="gpu", device_kind="Unknown GPU"))()
    flops.peak_flops_total(0.0, [gpu], "bfloat16")
    assert sizes == [flops.ACCELERATOR_MATMUL] and flops.ACCELERATOR_MATMUL >= 8192


def test_moe_counts_activated_experts_and_router():
    moe = dict(num_experts=4, k=2, every=2)
    # per layer: attention 64 + (dense MLP 64 + MoE (2 x 64 + router 16)) / 2 = 168
    assert flops.matmul_params_per_layer(_cfg(moe)) == 64 + (64 + 144) / 2


def test_zero_experts_is_the_dense_count():
    assert flops.matmul_params_per_layer(_cfg(dict(num_experts=0, k=1, every=1))) == \
        flops.matmul_params_per_layer(_cfg())


# ---- Spec-sheet peaks by device kind (as jax reports it) and compute dtype; hand values
# from the vendors' sheets, dense (no sparsity).
@pytest.mark.parametrize("kind, dtype, tflops", [
    ("Tesla V100-SXM2-32GB", "float16", 125.0),
    ("Tesla V100-SXM2-32GB", "bfloat16", 15.7),   # no bf16 tensor cores: the fp32 rate
    ("V100-32GB", "float32", 15.7),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
    ("NVIDIA A100 80GB PCIe", "float32", 19.5),   # not TF32's 156
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H200", "float16", 989.0),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA L40S", "bfloat16", 362.0),
    ("NVIDIA A10G", "float16", 125.0),
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),
])
def test_peak_by_device_kind_and_dtype(kind, dtype, tflops):
    assert flops.peak_tflops(kind, dtype) == tflops


def test_l4_is_a_whole_token_not_a_prefix_of_l40s():
    assert flops.known_device("NVIDIA L40S") == "L40S"
    assert flops.known_device("NVIDIA L4") == "L4"
    assert flops.known_device("TPU v5 lite") == "TPU v5 lite"  # not v5p's "TPU v5"


def test_unknown_kinds_and_dtypes_have_no_figure():
    assert flops.peak_tflops("cpu", "float32") is None
    assert flops.peak_tflops("NVIDIA L400", "bfloat16") is None
    assert flops.peak_tflops("TPU v4", "float16") is None


def test_peak_flops_total_takes_the_compute_dtype():
    gpu = type("Device", (), dict(device_kind="Tesla V100-SXM2-16GB", platform="gpu"))()
    assert flops.peak_flops_total(0.0, [gpu] * 8, "float16") == (
        8 * 125e12, "spec sheet (V100 float16)")
    assert flops.peak_flops_total(0.0, [gpu] * 8, jnp.bfloat16)[0] == 8 * 15.7e12
    assert flops.peak_flops_total(2.0, [gpu] * 8, "float16") == (16e12, "configured")


def _v100_plan(dtype, **hw):
    from configs import m6_10b
    from m6jax import plan
    c = m6_10b.get_config("paper")
    c.model.dtype = dtype
    c.hardware.update(hw)
    return plan.plan(c)


def test_a_v100_plan_in_bfloat16_computes_8x_longer_than_in_float16():
    f16, bf16 = _v100_plan("float16"), _v100_plan("bfloat16")
    assert (f16["device_tflops"], bf16["device_tflops"]) == (125.0, 15.7)
    assert bf16["compute_s_per_step"] / f16["compute_s_per_step"] == pytest.approx(125 / 15.7)
    forced = _v100_plan("bfloat16", device_tflops=125.0)  # hardware.device_tflops overrides
    assert forced["compute_s_per_step"] == pytest.approx(f16["compute_s_per_step"])
    assert forced["device_tflops_source"] == "hardware.device_tflops"
