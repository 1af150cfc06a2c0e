#!/usr/bin/env bash
# The GPU numbers in results/gpu/, as run on a lent H200 through the workplace's device tool (no internet there:
# the lock's transformers and its needs travel as wheels in .whl/, see results/gpu/README.md). Elsewhere:
#   OUT=/some/dir bash results/gpu/h200.sh [llama codegen n30 train diag]   (the runs to do; default: the first four)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-results/gpu}
PARTS=${*:-llama codegen n30 train}
want() { [[ " $PARTS " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.csv"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# CodeGen-350M-sized Llama layout: the slot engine (the path SmolLM2 takes), training in bf16-mixed
want llama && timeout 200 python3 benchmarks/gpu_throughput.py --out "$OUT/throughput_llama.json" 2>&1 | tee "$OUT/throughput_llama.log"
# CodeGen's own blocks: the generic engine path that CodeGen-6B takes at paper scale
want codegen && timeout 150 python3 benchmarks/gpu_throughput.py --arch codegen --out "$OUT/throughput_codegen.json" 2>&1 \
  | tee "$OUT/throughput_codegen.log"
# the paper's sampling shape: 30 samples per prompt
want n30 && timeout 120 python3 benchmarks/gpu_throughput.py --n 30 --prompts 32 --baseline-prompts 4 --steps 3 \
  --out "$OUT/throughput_llama_n30.json" 2>&1 | tee "$OUT/throughput_llama_n30.log"
# the trainer=gpu preset's Lightning run, twice with one seed, then the engine from its checkpoint
want train && timeout 120 python3 results/gpu/train_check.py --out "$OUT/train_check.json" 2>&1 | tee "$OUT/train_check.log"
# diagnostic_cublas/: CodeGen's generic path with cuBLAS's fixed workspace (small sizes, to fit the lease's end)
want diag && CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 60 python3 benchmarks/gpu_throughput.py --arch codegen --steps 1 \
  --warmup 1 --micro-batch 1 --prompts 32 --baseline-prompts 1 --out "$OUT/cg_cublas.json" > /dev/null 2> "$OUT/cg_cublas.err"
