"""The distillation run: config and presets, the loop, one iteration's draws and updates, checkpoints, processes."""
