#!/usr/bin/env bash
# The powered CPU reproduction's blocks (README.md here), from the repository root:
#   RUNS=/work/runs19 ILF_LAB_CACHE_DIR=/work/cache19 bash results/cpu_powered/run_block.sh 1|2|3a|3b
# Each block is one resumable command: run it again after an interruption (finished runs and stages are kept).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
block=${1:?usage: run_block.sh 1|2|3a|3b}
RUNS=${RUNS:-/work/runs19}
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data} ILF_LAB_CACHE_DIR=${ILF_LAB_CACHE_DIR:-/work/cache19}
# sampling.prompt_kv=copy: the cache these runs sampled with (the default until session 9). Pinned since session 9,
# so resuming an earlier block's folder stops (`use a new --out`) instead of mixing the two caches' samples.
scale=(scale=cpu sampling.dtype=bfloat16 sampling.prompt_kv=copy logger=none)
common=(--grid policy.lr=2e-5,1e-4 --grid policy.epochs=2,5 --select data.max_test_tasks=100 --select sampling.n=10
        "${scale[@]}")

# Block 3b: the analyses at seed 0 with the cuts stated in README.md (session 7), each into $RUNS/analysis.
analyses() {
  local out=$RUNS/analysis
  # Figure 3: perplexity of the refinements and of MBPP's gold programs under the base model (block 1's ILF
  # seed 0 at its A.1 point: in session 8 every stage but the perplexity one came from the cache)
  python -m ilf_lab experiment=ilf eval.perplexity=true seed=0 policy.lr=1e-4 policy.epochs=5 "${scale[@]}" \
    hydra.run.dir="$out/perplexity"
  # Table 3's πRefine row at the protocol's 30 refinements per task (block 1's ILF seed 0; from the cache in session 8)
  python -m ilf_lab experiment=refine_trained "${scale[@]}" hydra.run.dir="$out/refine/refine_trained"
  # Tables 2-3's base-model rows (refine.n=10) and the base model's own programs on MBPPTrain (sampling.n=10)
  python -m ilf_lab -m --config-dir sweeps --config-name refine_analysis hydra.sweep.dir="$out/refine/base" \
    experiment=refine_base_1shot,refine_base_1shot_shuffled,zero_shot_mbpptrain refine.n=10 sampling.n=10 \
    "${scale[@]}"
  # Figure 4: 2-shot LLM feedback on 50/100/200 tasks (feedback.n=1, sampling.n=10) at the 2-shot row's A.1 point
  local point
  point=$(python -c 'import json,sys; p=json.load(open(sys.argv[1]))["chosen"]["instructgpt_2shot"]["point"]
print(" ".join(f"{k}={v}" for k, v in p.items()))' "$RUNS/a1_llm/selection.json")
  # shellcheck disable=SC2086  # $point is k=v words
  python -m ilf_lab -m --config-dir sweeps --config-name feedback_scaling hydra.sweep.dir="$out/scaling" \
    feedback.n=1 sampling.n=10 $point "${scale[@]}"
}

case $block in
  1)  out=$RUNS/a1;     args=(--methods mbpp_gold,human_refinements --seeds 0) ;;
  2)  out=$RUNS/a1;     args=(--methods mbpp_gold,human_refinements --seeds 0,1,2) ;;
  3a) out=$RUNS/a1_llm; args=(--methods instructgpt_1shot,instructgpt_2shot --seeds 0) ;;
  3b) analyses; exit ;;
  *)  echo "error: unknown block $block (1, 2, 3a or 3b)" >&2; exit 2 ;;
esac
cmd=(python -m ilf_lab.a1 --out "$out" "${args[@]}" "${common[@]}")
if [ -e "$out" ]; then cmd+=(--resume); fi
"${cmd[@]}"
