#!/usr/bin/env bash
# The GPU measurements, as one run on a lent GPU machine (its image has torch, transformers, sympy,
# networkx and tabulate; fxstream runs from the checkout). Tables go to $OUT (default benchmarks/results):
#   transformers_gpu_inductor.md   GPT-2-small / ViT-B/16 time and peak memory through Inductor (Triton)
#   planner_gpu.md                 predicted peak memory vs torch.cuda.max_memory_allocated (MLP, CNN, GPT-2)
#   transformers_gpu_eager.md      the transformers rows on the eager backend
#   log.txt                        everything printed, rows as they finish
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
shape=(--batch "${BATCH:-8}" --seq "${SEQ:-256}" --repeats 20 --no-flops)  # FLOP counts do not depend on the device, and would eat the time limits
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  timeout "${INDUCTOR_SECONDS:-250}" python3 benchmarks/bench_transformers.py --device cuda --backends inductor \
    --modes deterministic "fxstream all linear" "fxstream last 2 blocks" "fxstream all linear, bf16 var GEMMs" \
    "fxstream last 2 blocks, bf16 var GEMMs" MC-10 "${shape[@]}" --out "$out/transformers_gpu_inductor.md"
  timeout "${PLANNER_SECONDS:-80}" python3 benchmarks/bench_planner.py --device cuda --out "$out/planner_gpu.md"
  timeout "${EAGER_SECONDS:-60}" python3 benchmarks/bench_transformers.py --device cuda --backends eager \
    --modes deterministic "fxstream all linear" "fxstream last 2 blocks" "${shape[@]}" \
    --out "$out/transformers_gpu_eager.md"
} 2>&1 | tee "$out/log.txt"
