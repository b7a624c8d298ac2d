#!/usr/bin/env bash
# DMD vs EMD at equal iterations (docs/BENCHMARKS.md, "DMD vs EMD at equal iterations"): students of the toy teacher
# on its full and partial captions, every point with the same 2000 iterations (a cosine schedule over 2000), each
# changing one thing against its baseline (written beside each point). Every point runs on one torch thread, so two
# points share the 2-core machine under the same conditions; a checkpoint every 250 iterations is kept, and
# benchmarks/mode_score.py scores any of them (mode coverage with 768 samples per under-specified prompt).
#   bash benchmarks/em_study.sh dmd 1                     # POINT SEED [ITERATIONS]
#   bash benchmarks/em_study.sh --print                   # every point's flags, nothing run
# Results: runs/study22/POINT_sSEED (the run, wall.txt its distill seconds) and, after scoring,
# benchmarks/results/study22/POINT_sSEED_STEP.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
source benchmarks/toy_flags.sh
BASE="$TOY_FLAGS --validate-every 500 --checkpoint-every 250 --keep-checkpoints 20"  # 2000 iterations by default
declare -A POINTS=(
  # the baseline: DMD is the K = 1, gamma_eps = 2 case of the same code (ALGORITHM.md, the K = 1 reduction)
  [dmd]="--num-langevin-steps 1 --gamma-eps 2.0 --gamma-z 0.0"
  # against dmd: the chain only (K = 2, eps-only: the toy preset's "EMD" until this study)
  [emd_k2]="--num-langevin-steps 2 --gamma-z 0.0"
  # against emd_k2: z moves (the snr step, 0.025 at t = 200 where the E-step probe saw the chain move samples,
  # 0.096 at t = 800; benchmarks/results/estep_probe)
  [emd_k2_z]="--num-langevin-steps 2 --gamma-z 0.1 --z-step snr"
  # against dmd: the weighting only (DMD's normaliser as a running mean per t bin)
  [dmd_t]="--num-langevin-steps 1 --gamma-eps 2.0 --gamma-z 0.0 --weighting dmd-t"
)
if [[ "${1:-}" == "--print" ]]; then
  for name in "${!POINTS[@]}"; do echo "$name: ${POINTS[$name]}"; done
  exit 0
fi
name=$1 seed=$2 iterations=${3:-2000}
spec=${POINTS[$name]:?unknown point $name}
run=runs/study22/${name}_s$seed
start=$(date +%s)
# shellcheck disable=SC2086
"${PYTHON:-.venv/bin/python}" -m emd_t2i.cli distill --teacher toy --output "$run" --seed "$seed" --iterations "$iterations" $BASE $spec
echo "distill_seconds $(($(date +%s) - start))" > "$run/wall.txt"
