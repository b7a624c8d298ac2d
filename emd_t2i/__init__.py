"""emd-t2i: distill a Stable Diffusion teacher into a one-step generator with EM Distillation."""

__version__ = "0.1.0"
