# The toy preset of 2026-11-29 (emd_t2i/training/presets.py, TOY_TABLE) with every value written out, on the toy's full
# and partial captions: what both DMD-vs-EMD studies (mode_study.sh, em_study.sh) start from. Sourced, not run.
TARGETS="to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj"
TARGETS="$TARGETS,conv_in,conv_out,conv,linear_1,linear_2"
TOY_FLAGS="--prompts prompts/toy.txt --batch-size 32 --generator-lr 2e-3 --fake-lr 1e-3 --lr-schedule cosine
  --generator-rank 64 --fake-rank 64 --fake-updates 5 --ema-decay 0.99 --guidance-scale 1.75 --t-star 800
  --target-modules $TARGETS --mixed-precision no --noise-cancellation --cancel-initial-noise --weighting dmd
  --z-step constant --gamma-eps 0.5 --log-every 10 --num-validation-prompts 8"
