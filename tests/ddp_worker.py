"""Run by tests/test_ddp.py under torchrun: distill on one rank of two, then save this rank's LoRA weights."""

import os
import sys

import torch
from safetensors.torch import save_file

from emd_t2i import train
from emd_t2i.config import DistillConfig
from emd_t2i.roles import GENERATOR, adapter_state_dict

teacher, prompts, output = sys.argv[1:4]
captured = {}
real_resume = train.resume


def capture(run, run_dir):  # keep a handle on this rank's UNet to save it after the run
    captured["unet"] = run.roles.unet
    return real_resume(run, run_dir)


train.resume = capture
torch.set_num_threads(1)
cfg = DistillConfig(teacher=teacher, prompts=prompts, output=output, iterations=3, batch_size=1,
                    num_langevin_steps=2, gamma_z=0.1, generator_rank=4, fake_rank=4, validate_every=0,
                    checkpoint_every=3, device="cpu")
train.distill(cfg)
rank = int(os.environ["RANK"])
save_file(adapter_state_dict(captured["unet"], GENERATOR), f"{output}/rank{rank}.safetensors")
