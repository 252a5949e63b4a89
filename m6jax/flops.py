"""Parameter and FLOP counts, device peaks and model FLOPs utilisation (MFU)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak TFLOP/s per chip by device kind and compute dtype, from the vendors' spec
# sheets (tensor cores / matrix units, no sparsity). float32 is the CUDA-core rate (TF32
# tensor cores, e.g. A100's 156, are not what a float32 matmul gets by default). A dtype
# missing from a row has no figure here (measured instead, or no compute time planned).
_HALF = lambda tf, f32: {"bfloat16": tf, "float16": tf, "float32": f32}  # noqa: E731
KNOWN_PEAK_TFLOPS = {
    # V100 (SXM2) has fp16 tensor cores only: bf16 has no tensor-core path and runs at
    # about the fp32 CUDA-core rate, 15.7, which is what we plan for it.
    "V100": {"float16": 125.0, "bfloat16": 15.7, "float32": 15.7},
    "V100 PCIe": {"float16": 112.0, "bfloat16": 14.0, "float32": 14.0},
    "A100": _HALF(312.0, 19.5),
    "H100": _HALF(989.0, 67.0),  # SXM
    "H100 PCIe": _HALF(756.0, 51.0),
    "H200": _HALF(989.0, 67.0),
    "L4": _HALF(121.0, 30.3),
    "L40S": _HALF(362.0, 91.6),
    # A10G is AWS's variant of the A10; NVIDIA's A10 spec sheet says 125 dense bf16/fp16.
    "A10G": _HALF(125.0, 31.2),
    # TPUs: bf16 matrix units (no fp16 rate; float32 matmuls default to bf16 passes).
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0}, "TPU v5e": {"bfloat16": 197.0},
    "TPU v5": {"bfloat16": 459.0}, "TPU v5p": {"bfloat16": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0}, "TPU v6e": {"bfloat16": 918.0},
}


def _tokens(s: str) -> list[str]:
    return s.lower().replace("-", " ").replace("_", " ").split()


def known_device(device_kind: str) -> str | None:
    """The `KNOWN_PEAK_TFLOPS` row of a device kind ('Tesla V100-SXM2-32GB' -> 'V100'):
    the longest row whose tokens occur consecutively among the kind's tokens (split on
    spaces, '-' and '_'), so 'L4' is not 'NVIDIA L40S' and 'TPU v5' is not 'TPU v5 lite'."""
    kind = _tokens(device_kind or "")
    best = None
    for name in KNOWN_PEAK_TFLOPS:
        t = _tokens(name)
        if any(kind[i:i + len(t)] == t for i in range(len(kind) - len(t) + 1)):
            if best is None or len(t) > len(_tokens(best)):
                best = name
    return best


def peak_tflops(device_kind: str, dtype) -> float | None:
    """Spec-sheet dense peak TFLOP/s of one `device_kind` chip computing in `dtype`
    (e.g. model.dtype), or None if the table has no figure for it."""
    name = known_device(device_kind)
    return None if name is None else KNOWN_PEAK_TFLOPS[name].get(jnp.dtype(dtype).name)


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
    attention scores and weighted sum over the (query, key) pairs computed (S x S dense;
    the kept blocks' pairs under model.attention='sparse'), and the LM head over the
    text positions only. Rematerialisation is not counted (it is not model FLOPs).
    """
    s = num_patches + text_len
    d = model_cfg.emb_dim
    matmul = (num_patches * patch_dim * d
              + s * model_cfg.num_layers * matmul_params_per_layer(model_cfg)
              + text_len * model_cfg.vocab_size * d)
    attention = model_cfg.num_layers * 2 * attended_pairs(model_cfg, s) * d  # QK^T, AV
    return 6.0 * (matmul + attention)


def attended_pairs(model_cfg, s: int) -> int:
    """(query, key) pairs one sequence of `s` positions computes: s * s, or the pairs in
    the sparse pattern's kept blocks (m6jax/model/sparse.py's Pattern.layout, restated
    here below the model layer; tests/test_flops.py checks the two agree)."""
    if model_cfg.attention != "sparse":
        return s * s
    bs = int(model_cfg.sparse_block_size)
    nb = -(-s // bs)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    g, stride = int(model_cfg.sparse_global_blocks), int(model_cfg.sparse_stride)
    kept = ((np.abs(i - j) <= int(model_cfg.sparse_window)) | (j % stride == stride - 1)
            | (i < g) | (j < g))
    full = np.kron(kept, np.ones((bs, bs), bool))[:s, :s]
    return int(full.sum())


# The accelerator fallback's matmul side: 2048^2 (17 GFLOP) takes ~20 us on an H100,
# launch- and clock-ramp-bound, so it under-reads the peak and inflates MFU.
ACCELERATOR_MATMUL = 8192


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


def peak_flops_total(configured_tflops_per_device: float, devices,
                     dtype="bfloat16") -> tuple[float, str]:
    """Peak FLOP/s of all devices together computing in `dtype` (model.dtype), and where
    the figure came from: configured, the spec-sheet table, or measured.

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
    name, tf = known_device(kind), peak_tflops(kind, dtype)
    if tf is not None:
        return tf * 1e12 * n, f"spec sheet ({name} {jnp.dtype(dtype).name})"
    return (measure_peak_flops(ACCELERATOR_MATMUL, dtype=jnp.dtype(dtype)) * n,
            f"measured {jnp.dtype(dtype).name} matmul on {kind}")


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
