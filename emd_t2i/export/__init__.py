"""What a run leaves for others: diffusers and kohya LoRAs, a one-step pipeline folder, its model card, sampling."""
