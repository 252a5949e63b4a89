#!/usr/bin/env bash
# The streamed-offload checks that need a GPU, as one short run (about 6 minutes on one
# H200 for 1-2, not timed for 3: never run, no GPU was lent to issue 26; nothing here
# measures memory on CPU). Writes JSON next to the CPU results:
#   1. a model that fits without offload (3.2B params, fp32 AdamW, 16 x 4096): step time and
#      peak device bytes with no offload, optimizer offload, full offload and half the
#      layers offloaded (goal: full offload <= 1.5x the step time of no offload);
#   2. a model whose training state is >= 2x the device memory it is given (the device is
#      capped at 10% of an H200 = 14 GiB; 12 x 4096 = 2.4B params, 38 GB of params,
#      gradients and moments): OOM without offload, trains with everything offloaded;
#   3. every phase of an offloaded Pseudo-to-Real run on that capped device (issue 26):
#      init, step, save, restore, switch, Real step, eval, generate, with bytes_in_use and
#      peak_bytes_in_use after each (benchmarks/offload_phases.py) beside the planned phases.
# Usage: bash benchmarks/gpu_offload_check.sh [OUTDIR]   (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
common=(--emb_dim=4096 --num_heads=32 --text_len=496 --batch_size=8 --vocab_size=32000
        --dtype=bfloat16 --remat_policy=full --steps=5)
python benchmarks/offload_memory.py "${common[@]}" --num_layers=16 \
    --settings="none/none;all/none;all/all;0,1,2,3,4,5,6,7/0,1,2,3,4,5,6,7" \
    --json="$out/offload_memory_gpu.json"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 python benchmarks/offload_memory.py "${common[@]}" \
    --num_layers=12 --settings="none/none;all/all" --json="$out/offload_memory_gpu_2x.json"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 python benchmarks/offload_phases.py --emb_dim=4096 \
    --num_heads=32 --num_layers=12 --text_len=496 --batch_size=8 --vocab_size=32000 \
    --dtype=bfloat16 --json="$out/offload_phases_gpu.json"
