#!/usr/bin/env bash
# The sweep behind the toy preset's defaults (docs/BENCHMARKS.md, "Sweep"). Each point trains one student with
# benchmarks/toy_quality.py and evaluates it after each stage of its curve (a longer stage resumes the shorter
# run, which is bit-identical to an uninterrupted one), writing benchmarks/results/sweep/NAME_ITERS.json.
# One torch thread per point, so two points can share a 2-core machine. Run a subset by naming points:
#   bash benchmarks/toy_sweep.sh emd_r64_f3 dmd_r64_f3
#   bash benchmarks/toy_sweep.sh --print      # every point's stages and flags, nothing run
# DMD-mode points (K = 1, gamma_eps = 2, gamma_z = 0) cost about a third of an EMD point at K = 4.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
DMD="--set num_langevin_steps=1 --set gamma_eps=2.0 --set gamma_z=0.0"
R64="--set generator_rank=64 --set fake_rank=64"
# Every point stands on a chain of pins, never on the moving toy preset, so that it keeps meaning what it meant
# when the preset changes (tests/test_sweep_pins.py rebuilds each recorded point's config from these flags).
# Later flags override earlier ones. TARGETS: the default LoRA targets (config.DEFAULT_TARGET_MODULES).
TARGETS='"to_q","to_k","to_v","to_out.0","proj_in","proj_out","ff.net.0.proj","ff.net.2","conv1","conv2","conv_shortcut","time_emb_proj"'
# ... plus conv_in, conv_out, the down/upsamplers' conv and the time embedding's linears
TARGETS_IO="[$TARGETS,\"conv_in\",\"conv_out\",\"conv\",\"linear_1\",\"linear_2\"]"
# OLD: the first toy preset (fake_updates 1, no NC0, rank 16, EMA off, lr 3e-4, K = 4, gamma_z 0.03, t* = 999, w 3).
OLD="--set num_langevin_steps=4 --set gamma_eps=0.5 --set gamma_z=0.03 --set t_star=999 --set guidance_scale=3.0 --set generator_lr=3e-4 --set fake_lr=3e-4 --set lr_schedule=\"constant\" --set generator_rank=16 --set fake_rank=16 --set fake_updates=1 --set batch_size=32 --set ema_decay=0.0 --set cancel_initial_noise=false --set weighting=\"dmd\" --set target_modules=[$TARGETS]"
# P999: the t* = 999 preset (rank 64, 5 fake updates at lr 1e-3, EMA 0.99, NC0), behind preset_* and tstar800_*.
P999="$OLD --set generator_rank=64 --set fake_rank=64 --set fake_updates=5 --set fake_lr=1e-3 --set ema_decay=0.99 --set cancel_initial_noise=true"
# T800: the t* = 800 preset with a constant generator lr 1e-3, behind toy_*.
T800="$P999 --set t_star=800 --set generator_lr=1e-3"
# K2: K = 2, gamma_z = 0, cosine from lr 2e-3, guidance 3, behind k2_*.
K2="$T800 --set num_langevin_steps=2 --set gamma_z=0.0 --set lr_schedule=\"cosine\" --set generator_lr=2e-3"
# Q: the guidance-2.25 preset, behind q_*.
Q="$K2 --set guidance_scale=2.25"
# name -> "stages|flags"
declare -A POINTS=(
  [dmd_lr3e-4]="600|$OLD $DMD"
  [dmd_lr1e-3]="600|$OLD $DMD --set generator_lr=1e-3 --set fake_lr=1e-3"
  [dmd_lr1e-3_f3]="600|$OLD $DMD --set generator_lr=1e-3 --set fake_lr=1e-3 --set fake_updates=3"
  [dmd_lr3e-3]="600|$OLD $DMD --set generator_lr=3e-3 --set fake_lr=3e-3"
  [dmd_r64]="600|$OLD $DMD $R64"
  [dmd_r64_f3]="600|$OLD $DMD $R64 --set fake_updates=3"
  [dmd_r64_f5_b16]="300 600|$OLD $DMD $R64 --set fake_updates=5 --set batch_size=16"
  [emd_r64_f3]="200 400|$OLD $R64 --set fake_updates=3"
  [emd_r64_f5_flr1e-3_ema]="200|$OLD $R64 --set fake_updates=5 --set fake_lr=1e-3 --set ema_decay=0.99"
  [emd_r64_f5_flr1e-3_ema_nc0]="200 400 600 800|$OLD $R64 --set fake_updates=5 --set fake_lr=1e-3 --set ema_decay=0.99 --set cancel_initial_noise=true"
  [emd_r64_f3_lr1e-3_ema_nc0]="200 400|$OLD $R64 --set fake_updates=3 --set generator_lr=1e-3 --set fake_lr=1e-3 --set ema_decay=0.99 --set cancel_initial_noise=true"
  # One EMD knob at a time from the current toy preset (its own 400-iteration point is emd_r64_f5_flr1e-3_ema_nc0_400).
  [preset_gz0]="400|$P999 --set gamma_z=0.0"
  [preset_gz0.1]="400|$P999 --set gamma_z=0.1"
  [preset_gz0.05]="400|$P999 --set gamma_z=0.05"
  [preset_k8]="400|$P999 --set num_langevin_steps=8"
  [preset_geps1]="400|$P999 --set gamma_eps=1.0"
  [preset_wnone]="400|$P999 --set weighting=\"none\""
  [preset_cfg5]="400|$P999 --set guidance_scale=5.0"
  [preset_cfg2]="400|$P999 --set guidance_scale=2.0"
  [preset_flr3e-4]="400|$P999 --set fake_lr=3e-4"
  [preset_tstar700]="400|$P999 --set t_star=700"
  [preset_tstar500]="400|$P999 --set t_star=500"
  [preset_tstar800]="400 800|$P999 --set t_star=800"
  [preset_tstar600]="400|$P999 --set t_star=600"
  [preset_tstar900]="400|$P999 --set t_star=900"
  # From t* = 800: G1 amplifies a change of the eps output by sigma/alpha = 5.1 instead of 14.6 at t* = 999
  [tstar800_lrg1e-3]="400 800|$P999 --set t_star=800 --set generator_lr=1e-3"
  [tstar800_gz0.05]="400|$P999 --set t_star=800 --set gamma_z=0.05"
  [tstar800_lrg2e-3]="400 800|$P999 --set t_star=800 --set generator_lr=2e-3"
  # From the t* = 800, generator lr 1e-3 preset (the one before the cosine preset; T800 pins it), toward the
  # quickstart's 15 minutes
  [toy_gz0]="400 600 800|$T800 --set gamma_z=0.0"
  [toy_cos_lrg2e-3]="400|$T800 --set lr_schedule=\"cosine\" --set generator_lr=2e-3"
  [toy_cos_lrg2e-3_gz0]="500|$T800 --set lr_schedule=\"cosine\" --set generator_lr=2e-3 --set gamma_z=0.0"
  [toy_cos_lrg3e-3_gz0]="500|$T800 --set lr_schedule=\"cosine\" --set generator_lr=3e-3 --set gamma_z=0.0"
  [toy_cos_lrg2e-3_gz0_k2]="600|$T800 --set lr_schedule=\"cosine\" --set generator_lr=2e-3 --set gamma_z=0.0 --set num_langevin_steps=2"
  [toy_cos_lrg2e-3_gz0_b24]="600|$T800 --set lr_schedule=\"cosine\" --set generator_lr=2e-3 --set gamma_z=0.0 --set batch_size=24"
  # From the current preset: can diversity be bought back?
  [k2_cfg2.5]="600|$K2 --set guidance_scale=2.5"
  [k2_cfg2]="600|$K2 --set guidance_scale=2.0"
  # The current preset with other seeds: how far apart are two training runs of one config?
  [k2_cfg2.25_seed1]="600|$K2 --set guidance_scale=2.25 --set seed=1"
  [k2_cfg2.25_seed2]="600|$K2 --set guidance_scale=2.25 --set seed=2"
  [k2_gz0.03]="600|$K2 --set gamma_z=0.03"
  # From the guidance-2.25 preset (Q pins it): cheaper iterations, more of them in the same time. At one thread,
  # fake_updates 3 runs 1.45x as many iterations per second as 5, rank 32 1.22x, both 1.78x (the stage
  # keeps the point's time equal to the preset's 600 iterations).
  [q_f3]="870|$Q --set fake_updates=3"
  [q_r32]="730|$Q --set generator_rank=32 --set fake_rank=32"
  [q_f3_r32]="1070|$Q --set fake_updates=3 --set generator_rank=32 --set fake_rank=32"
  [q_f3_r32_cfg2.5]="1070|$Q --set fake_updates=3 --set generator_rank=32 --set fake_rank=32 --set guidance_scale=2.5"
  [q_1200]="1200|$Q"
  # EMD's z-chain (the oracle's mode-covering piece, ALGORITHM.md) back on at K = 2
  [q_gz0.03]="600|$Q --set gamma_z=0.03"
  [q_gz0.06]="600|$Q --set gamma_z=0.06"
  # The student's position spread is ~0.8 of the teacher's: does a fake score that tracks the generator closer help?
  [q_flr2e-3]="600|$Q --set fake_lr=2e-3"
  [q_f8]="600|$Q --set fake_updates=8"
  [q_flr2e-3_cfg2.5]="600|$Q --set fake_lr=2e-3 --set guidance_scale=2.5"
  [q_flr4e-3_cfg2.5]="600|$Q --set fake_lr=4e-3 --set guidance_scale=2.5"
  [q_flr2e-3_cfg2.375]="600|$Q --set fake_lr=2e-3 --set guidance_scale=2.375"
  [q_flr2e-3_cfg2.375_seed1]="600|$Q --set fake_lr=2e-3 --set guidance_scale=2.375 --set seed=1"
  # Position spread is what the students lack: LoRA also on the layers that map noise to layout, and a lower t*
  [q_io]="600|$Q --set target_modules=$TARGETS_IO"
  [q_tstar700]="600|$Q --set t_star=700"
  [q_io_cfg2]="600|$Q --set target_modules=$TARGETS_IO --set guidance_scale=2.0"
  [q_io_cfg1.75]="600|$Q --set target_modules=$TARGETS_IO --set guidance_scale=1.75"
)
names=("$@")
if [ "${1:-}" = "--print" ]; then  # name|stage|flags of every point, for tests/test_sweep_pins.py; runs nothing
  for name in "${!POINTS[@]}"; do
    for n in ${POINTS[$name]%%|*}; do echo "$name|$n|${POINTS[$name]#*|}"; done
  done
  exit 0
fi
[ ${#names[@]} -gt 0 ] || names=("${!POINTS[@]}")
for name in "${names[@]}"; do
  spec=${POINTS[$name]:?unknown point $name}
  for n in ${spec%%|*}; do
    out="benchmarks/results/sweep/${name}_$n.json"
    [ -f "$out" ] && { echo "skip $out (done)"; continue; }
    # shellcheck disable=SC2086
    python benchmarks/toy_quality.py --rows emd ${spec#*|} --iterations "$n" --runs "runs/sweep/$name" --out "$out"
  done
done
