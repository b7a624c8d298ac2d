"""The kohya LoRA file AUTOMATIC1111 and ComfyUI load: key names in the layout each base model's clients expect,
kohya's metadata, and a check of the keys through diffusers' own kohya reader.

Key names follow kohya-ss/sd-scripts: SD 1.x / 2.x LoRAs name UNet modules after diffusers
(`lora_unet_down_blocks_0_attentions_0_..._to_q`), SDXL LoRAs after Stability's layout
(`lora_unet_input_blocks_4_1_..._to_q`), which is what its SDXL trainer writes. AUTOMATIC1111 turns the first kind
into Stability names by rules written for SD 1.x's block layout, which map SDXL's `add_embedding` and the
upsampler of its first up block to nothing; the second kind it and ComfyUI look up as they are.
"""

from __future__ import annotations

import json

import torch

from emd_t2i.errors import UserError

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
OPENCLIP_H_WIDTH = 1024  # SD 2.x's text encoder (OpenCLIP ViT-H/14) width = its UNet's cross_attention_dim

# kohya-ss/sd-scripts: library/model_util.py::get_model_version_str_for_sd1_sd2, library/sdxl_model_util.py
# (MODEL_VERSION_SDXL_BASE_V1_0) and library/sai_model_spec.py (ARCH_*, IMPL_*)
BASE_MODEL_VERSION = {SD1: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}
ARCHITECTURE = {SD1: "stable-diffusion-v1", SD2: "stable-diffusion-v2-512", SDXL: "stable-diffusion-xl-v1-base"}
IMPLEMENTATION = {SD1: "diffusers", SD2: "diffusers", SDXL: "https://github.com/Stability-AI/generative-models"}

# diffusers UNet module -> Stability (LDM / SGM) module, outside the repeated blocks
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# inside a resnet block
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def base_model(unet_config) -> str:
    """SD1, SD2 or SDXL, told apart by the UNet: SDXL's takes pooled text and time ids, SD 2.x's cross-attends to
    OpenCLIP ViT-H's 1024-wide states (SD 1.x: CLIP ViT-L's 768)."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return SDXL
    return SD2 if unet_config.cross_attention_dim == OPENCLIP_H_WIDTH else SD1


def ldm_module_name(module: str, unet_config) -> str:
    """A diffusers UNet module path -> the same module in Stability's UNet (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in` for SD's two layers per block). Each level of Stability's UNet holds layers + 1
    blocks: the down path's last is the downsampler, the up path's last block also holds the upsampler (after the
    attention, if the level has one)."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    per_level = unet_config.layers_per_block + 1
    parts = module.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        block = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
    elif parts[0] in ("down_blocks", "up_blocks"):
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{(level + 1) * per_level}.0.op", *rest[1:]])
        if kind == "upsamplers":
            slot = 2 if "CrossAttn" in unet_config.up_block_types[level] else 1
            return ".".join([f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv", *rest[1:]])
        number = 1 + level * per_level + index if parts[0] == "down_blocks" else level * per_level + index
        path = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
        block = f"{path}.{number}.{1 if kind == 'attentions' else 0}"
    else:
        raise ValueError(f"no Stability name for UNet module {module}")
    if kind == "resnets":
        rest = [*_RESNET[rest[0]].split("."), *rest[1:]]
    return ".".join([block, *rest])


def kohya_name(module: str, unet_config, base: str) -> str:
    """`lora_unet_` + the module path with `_` for `.`: Stability's path for SDXL, diffusers' for SD 1.x / 2.x."""
    path = ldm_module_name(module, unet_config) if base == SDXL else module
    return "lora_unet_" + path.replace(".", "_")


def split_peft_key(key: str) -> tuple[str, str]:
    """`down_blocks.0.resnets.0.conv1.lora_A.weight` -> (`down_blocks.0.resnets.0.conv1`, `A`)."""
    module, sep, rest = key.rpartition(".lora_")
    assert sep and rest in ("A.weight", "B.weight"), f"unexpected generator LoRA key {key}"
    return module, rest[0]


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float, unet_config,
                     base: str) -> dict[str, torch.Tensor]:
    """peft keys -> `<kohya_name>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (a 0-d tensor)."""
    out = {}
    for key, value in peft_state.items():
        module, which = split_peft_key(key)
        name = kohya_name(module, unet_config, base)
        out[f"{name}.lora_down.weight" if which == "A" else f"{name}.lora_up.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(rank: int, alpha: float, target_modules, base: str, prediction_type: str,
                   resolution: int, title: str) -> dict[str, str]:
    """What kohya-ss writes into a LoRA (networks/extract_lora_from_models.py: the `ss_` keys; sai_model_spec.py: the
    `modelspec.` keys). AUTOMATIC1111 files a LoRA as SDXL when `ss_base_model_version` starts with "sdxl_", as SD2
    when `ss_v2` is "True", else as SD1 (extensions-builtin/Lora/network.py::NetworkOnDisk.detect_version), and
    hides LoRAs of another version than the loaded checkpoint's."""
    v_prediction = prediction_type == "v_prediction"
    version = BASE_MODEL_VERSION[base] + ("_v" if v_prediction and base != SDXL else "")
    architecture = "stable-diffusion-v2-768-v" if base == SD2 and v_prediction else ARCHITECTURE[base]
    conv = any(m.startswith("conv") for m in target_modules)
    meta = {
        "ss_v2": str(base == SD2),
        "ss_base_model_version": version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(float(alpha))} if conv else {}),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture + "/lora",
        "modelspec.implementation": IMPLEMENTATION[base],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    return meta


def check_round_trip(kohya: dict[str, torch.Tensor], peft_state: dict[str, torch.Tensor], pipeline_class: str,
                     unet_config) -> None:
    """Refuse a kohya file that diffusers' own kohya reader (SD's or SDXL's, given the UNet's config as
    `load_lora_weights` gives it) maps to other modules than ours."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    converted = getattr(diffusers, pipeline_class).lora_state_dict(dict(kohya), unet_config=unet_config)[0]
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    lost = sorted({split_peft_key(k)[0] for k in set(peft_state) ^ set(back)})
    if lost:
        raise UserError(
            f"the kohya format cannot express LoRA modules {lost[:4]} (diffusers reads them back as other "
            "modules): export without kohya (--format lora --format pipeline) or distill without them "
            "in --target-modules"
        )
