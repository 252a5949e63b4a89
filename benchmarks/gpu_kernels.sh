#!/usr/bin/env bash
# The kernel checks of issue 28 that need a GPU (Hopper for mgpu), as one short run.
# Never run: no GPU was lent to the sessions that wrote it. Writes JSON to OUTDIR:
#   1. mgpu (jax's Mosaic GPU ragged dot) against jax.lax.ragged_dot: values, gradients,
#      forward+backward time (exits non-zero if they differ beyond bf16 tolerance);
#   2. the dropless MoE layer at the peer shape in bf16: mgpu vs blocked vs ragged_dot;
#   3. attention at 4,096 and 16,384 tokens: XLA, blocks, jax's dense Triton kernel and our
#      block-sparse Triton kernel (time, memory, its gradients against blocks).
# Usage: bash benchmarks/gpu_kernels.sh [OUTDIR]   (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
python benchmarks/mgpu_check.py --json="$out/mgpu_gpu.json"
python benchmarks/moe_layer.py --shape=peer --dtype=bfloat16 --routers=topk:1,topk:2 \
    --dispatches=mgpu,blocked,ragged_dot --json="$out/moe_layer_gpu.json"
python benchmarks/attention.py --tokens=4096,16384 --fused=triton,triton_sparse \
    --json="$out/attention_gpu.json"
