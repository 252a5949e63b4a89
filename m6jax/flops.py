"""Parameter and FLOP counts, device peaks and model FLOPs utilisation (MFU)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak TFLOP/s per chip from vendor specs (no sparsity).
KNOWN_PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "A10G": 125.0,
    "L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def matmul_params_per_layer(model_cfg) -> float:
    """Matmul parameters one token meets per layer, averaged over the stack.

    An MoE layer counts what a token activates: its k chosen experts' MLPs plus the
    router, not all E experts (model FLOPs, the MFU numerator, are activated FLOPs).
    """
    d, f = model_cfg.emb_dim, model_cfg.mlp_dim
    moe = model_cfg.get("moe")
    if not moe or not moe.num_experts:
        return 4 * d * d + 2 * d * f
    moe_mlp = moe.k * 2 * d * f + d * moe.num_experts
    return 4 * d * d + ((moe.every - 1) * 2 * d * f + moe_mlp) / moe.every


def train_flops_per_sequence(model_cfg, num_patches: int, patch_dim: int, text_len: int) -> float:
    """Model FLOPs of one forward+backward pass over one sequence (6 x matmul FLOPs).

    Counts the patch projection, every layer's attention projections and MLP, the
    attention scores and weighted sum (full S x S, as computed), and the LM head over
    the text positions only. Rematerialisation is not counted (it is not model FLOPs).
    """
    s = num_patches + text_len
    d = model_cfg.emb_dim
    matmul = (num_patches * patch_dim * d
              + s * model_cfg.num_layers * matmul_params_per_layer(model_cfg)
              + text_len * model_cfg.vocab_size * d)
    attention = model_cfg.num_layers * 2 * s * s * d       # QK^T and AV, multiply-adds
    return 6.0 * (matmul + attention)


def measure_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of one large jitted matmul on the default device (this process's peak)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops_total(configured_tflops_per_device: float, devices) -> tuple[float, str]:
    """Peak FLOP/s of all devices together, and where the figure came from.

    CPU 'devices' faked with --xla_force_host_platform_device_count share the same
    cores, so on CPU the whole host's measured matmul rate is the peak, whatever the
    device count.
    """
    n = len(devices)
    if configured_tflops_per_device > 0:
        return configured_tflops_per_device * 1e12 * n, "configured"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measure_peak_flops(), "measured f32 matmul on this host"
    for name, tf in KNOWN_PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tf * 1e12 * n, f"spec sheet ({name} bf16)"
    return measure_peak_flops(dtype=jnp.bfloat16) * n, f"measured bf16 matmul on {kind}"


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
