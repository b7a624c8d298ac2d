"""The algorithm's named options, defined once: emd.py computes with them, the config validates flags against them
(this module imports nothing, so `emd-t2i --help` does not load torch)."""

WEIGHTINGS = ("dmd", "dmd-t", "none")  # w(t) of (M1): DMD's per-sample normaliser, its per-t-bin mean, or 1
Z_STEPS = ("constant", "snr", "jacobian")  # the (L2) step per t: emd.z_step_size
