#!/usr/bin/env bash
# What made results/cpu_*: Table 4, Tables 2-3 and Figure 4 at scale=cpu with SmolLM2-135M-Instruct on 2 CPU
# cores (~2.5 h in all, one seed). Run from the repository root after `bash scripts/setup.sh`; stages are cached
# in paths.cache_dir, so a killed run resumes and the three sweeps share what they can.
set -euo pipefail
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data}
out=${OUT:-multirun}
# Table 4 (six rows) + Figure 3 (perplexity of the fine-tuning sources under the base model)
# (made with the earlier cpu preset: refine.n=10, feedback.n=10; see git history of conf/scale/cpu.yaml)
SWEEP_DIR=$out/cpu_paper_table bash sweeps/paper_table.sh scale=cpu eval.perplexity=true
# Tables 2-3: πRefine vs. the base model zero-shot; related vs. shuffled feedback (no policy: stop_after=refine)
SWEEP_DIR=$out/cpu_refine_analysis bash sweeps/refine_analysis.sh scale=cpu
# Figure 4: 2-shot LLM feedback (SmolLM2 itself) on 50/100/200 MBPPTrain tasks, x0 from the policy's own samples
# of the first 200 MBPPTrain tasks; evaluated with 10 samples per MBPPTest task to fit the time
SWEEP_DIR=$out/cpu_feedback_scaling bash sweeps/feedback_scaling.sh scale=cpu data.max_train_tasks=200 sampling.n=10
# App. A.1 at CPU scale: ILF's policy learning rate on MBPPRefine (200 tasks x 5 samples), never on MBPPTest
# (the grid's batch size and epochs fixed at the table's; the stage cache reuses πRefine and the refinements)
python -m ilf_lab -m --config-dir sweeps --config-name hparams hydra.sweep.dir=$out/cpu_hparams \
  scale=cpu sampling.n=5 'policy.lr=1e-5,2e-5,5e-5' policy.batch_size=4 policy.epochs=2
read -r -a best <<< "$(python -m ilf_lab.report $out/cpu_hparams --best-overrides)"
python -m ilf_lab scale=cpu eval.split=test "${best[@]}" hydra.run.dir=$out/cpu_hparams_best   # once, on MBPPTest
mkdir -p results/cpu_hparams_best
for name in paper_table refine_analysis feedback_scaling hparams; do
  mkdir -p results/cpu_$name
  python -m ilf_lab.report "$out/cpu_$name" --out results/cpu_$name > results/cpu_$name/table.md
done
python -m ilf_lab.report $out/cpu_hparams_best $out/cpu_paper_table --out results/cpu_hparams_best > results/cpu_hparams_best/table.md
