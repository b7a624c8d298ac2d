#!/usr/bin/env bash
# Issue 17's comparison (docs/BENCHMARKS.md, "DMD vs EMD at equal wall-clock"): students of the toy teacher trained
# on its full and partial captions (prompts/toy.txt), scored by `emd-t2i eval` (full-prompt accuracy, diversity,
# shape fidelity, and mode coverage on the under-specified prompts against the 25-step teacher at the student's
# guidance). Every point runs on one torch thread, so two points share a 2-core machine under the same conditions;
# its iterations are set so that every point costs about the same wall-clock (15 minutes on one thread of the
# 2-core machine with a second point on the other core), from the measured seconds per iteration of each chain.
#   bash benchmarks/mode_study.sh dmd 0 emd_k8_snr 0      # pairs of POINT SEED, run one after another
#   bash benchmarks/mode_study.sh --print                 # every point's flags, nothing run
# Results: runs/mode_study/POINT_sSEED (the run) and benchmarks/results/mode_study/POINT_sSEED.json (its eval plus
# the distill wall-clock). Written down before any was run, like toy_sweep.sh: the points are pinned, not the preset.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
source benchmarks/toy_flags.sh
BASE="$TOY_FLAGS --validate-every 100 --checkpoint-every 50"
# Measured seconds per iteration (30 iterations, one thread, a teacher training on the other core):
# DMD 1.43, EMD K = 2 (eps only) 1.51, EMD K = 8 snr 3.2, EMD K = 4 snr 2.2. Iterations ~ 900 s / that.
declare -A POINTS=(
  # DMD: K = 1, gamma_eps = 2, no z step (ALGORITHM.md: exactly DMD's distribution-matching gradient)
  [dmd]="630|--num-langevin-steps 1 --gamma-eps 2.0 --gamma-z 0.0"
  # the toy preset's EMD: K = 2, eps-only chain
  [emd_k2]="600|--num-langevin-steps 2 --gamma-z 0.0"
  # the oracle's choice (ALGORITHM.md, "A t-dependent z step"): K = 8, snr z step 0.175, weighting none
  [emd_k8_snr]="280|--num-langevin-steps 8 --z-step snr --gamma-z 0.175 --weighting none"
  # half the chain, twice the generator updates
  [emd_k4_snr]="410|--num-langevin-steps 4 --z-step snr --gamma-z 0.2 --weighting none"
  # Added after dmd / emd_k8_snr at seed 0 (K = 8 at 280 iterations: accuracy 0.81, under-trained at this budget):
  # the cheapest chains. K = 2 with the snr z step (0.35 it/s against DMD's 0.44 with three jobs on two cores)
  [emd_k2_snr]="500|--num-langevin-steps 2 --z-step snr --gamma-z 0.175 --weighting none"
)
if [[ "${1:-}" == "--print" ]]; then
  for name in "${!POINTS[@]}"; do echo "$name: --iterations ${POINTS[$name]%%|*} ${POINTS[$name]#*|}"; done
  exit 0
fi
mkdir -p benchmarks/results/mode_study
while (($# >= 2)); do
  name=$1 seed=$2; shift 2
  spec=${POINTS[$name]:?unknown point $name}
  run=runs/mode_study/${name}_s$seed
  start=$(date +%s)
  # shellcheck disable=SC2086
  .venv/bin/emd-t2i distill --teacher toy --output "$run" --seed "$seed" --iterations "${spec%%|*}" $BASE ${spec#*|}
  seconds=$(($(date +%s) - start))
  .venv/bin/emd-t2i eval --model "$run/export" > /dev/null
  .venv/bin/python - "$run" "$seconds" "benchmarks/results/mode_study/${name}_s$seed.json" <<'EOF'
import json, sys
run, seconds, out = sys.argv[1:]
report = json.load(open(f"{run}/eval.json"))
report.update(distill_seconds=int(seconds), config=json.load(open(f"{run}/config.json")))
open(out, "w").write(json.dumps(report, indent=1) + "\n")
EOF
done
