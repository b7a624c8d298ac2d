#!/usr/bin/env bash
# The sweep behind the toy preset's defaults (docs/BENCHMARKS.md, "Sweep"). Each point trains one student with
# benchmarks/toy_quality.py and writes benchmarks/results/sweep/NAME.json. Run a subset by naming points:
#   bash benchmarks/toy_sweep.sh dmd_lr1e-3 emd_lr1e-3
# DMD-mode points (K = 1, gamma_eps = 2, gamma_z = 0) cost a third of an EMD point, so learning rates and
# fake-score updates were screened in DMD mode first and then confirmed with EMD.
set -euo pipefail
cd "$(dirname "$0")/.."
DMD=(--set num_langevin_steps=1 --set gamma_eps=2.0 --set gamma_z=0.0)
declare -A POINTS=(
  [dmd_lr3e-4_600]="${DMD[*]} --set iterations=600"
  [dmd_lr1e-3_600]="${DMD[*]} --set iterations=600 --set generator_lr=1e-3 --set fake_lr=1e-3"
  [dmd_lr1e-3_f3_600]="${DMD[*]} --set iterations=600 --set generator_lr=1e-3 --set fake_lr=1e-3 --set fake_updates=3"
  [dmd_lr3e-3_600]="${DMD[*]} --set iterations=600 --set generator_lr=3e-3 --set fake_lr=3e-3"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${!POINTS[@]}")
for name in "${names[@]}"; do
  [ -f "benchmarks/results/sweep/$name.json" ] && { echo "skip $name (done)"; continue; }
  # shellcheck disable=SC2086
  python benchmarks/toy_quality.py --rows emd ${POINTS[$name]} --runs "runs/sweep/$name" \
    --out "benchmarks/results/sweep/$name.json"
done
