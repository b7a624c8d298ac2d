"""The files of an export folder, named once (`emd-t2i export` writes them, `sample` and `eval` read them)."""

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
KOHYA_FILE = "emd_lora_kohya.safetensors"  # must not end in LORA_FILE, or diffusers would guess it
FACTS_FILE = "emd_t2i.json"  # what the generator says about itself (also in each file's safetensors metadata)
FACTS_PREFIX = "emd_t2i."  # the prefix of those facts' keys in the safetensors metadata
SCHEDULER_DIR = "scheduler"  # the one-step scheduler, also for teacher + LoRA users
PIPELINE_DIR = "pipeline"  # a complete one-step diffusers pipeline
