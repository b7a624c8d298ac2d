"""The kohya LoRA file as AUTOMATIC1111 and ComfyUI read it, key by key, and kohya's metadata for SD1, SD2, SDXL.

The clients' rules below are transcribed from their sources (read, not imported: neither is installable here):
- AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py: `convert_diffusers_name_to_compvis`
  (diffusers names -> Stability names, written for SD 1.x's layout: 3 blocks per level, no attention in the first up
  block) and `load_network`'s fallback for keys it leaves unchanged ("lora_unet" -> "diffusion_model", then a
  lookup among the model's modules); extensions-builtin/Lora/network.py: `NetworkOnDisk.detect_version`.
- comfyanonymous/ComfyUI comfy/lora.py: `model_lora_keys_unet` maps `lora_unet_` + every Stability UNet weight name
  and `lora_unet_` + every diffusers name of comfy/utils.py `unet_to_diffusers` (the whole UNet).
- kohya-ss/sd-scripts networks/extract_lora_from_models.py (the ss_ metadata) and library/sai_model_spec.py.
The Stability module names the clients look up come from `kohya.ldm_module_name`, itself checked against diffusers'
converter of Stability checkpoints (diffusers/loaders/single_file_utils.py::convert_ldm_unet_checkpoint).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from tiny import tiny_sdxl_unet, tiny_unet

from emd_t2i.export import kohya
from emd_t2i.models.roles import lora_config
from emd_t2i.training.presets import IO_TARGET_MODULES


def sd15_shaped_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """SD 1.5's block layout (and SD 2.x's with cross_attention_dim 1024) at a few channels."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, sample_size=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def sdxl_shaped_unet() -> UNet2DConditionModel:
    """SDXL base's block layout (three levels, 1 / 2 / 10 transformer layers, pooled text and time ids)."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 32), layers_per_block=2, sample_size=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32)


UNETS = {"tiny": tiny_unet, "tiny-sdxl": tiny_sdxl_unet, "sd15": sd15_shaped_unet, "sdxl": sdxl_shaped_unet}


def lora_modules(unet) -> list[str]:
    """The modules the generator LoRA covers with the SD presets' targets (IO layers included)."""
    unet.add_adapter(lora_config(4, IO_TARGET_MODULES))
    return sorted({k.rpartition(".lora_")[0] for k in get_peft_model_state_dict(unet)})


def stability_modules(unet) -> set[str]:
    """The weight-carrying modules of the Stability-layout UNet the clients load, by `ldm_module_name`."""
    return {kohya.ldm_module_name(k.rpartition(".")[0], unet.config) for k in unet.state_dict()}


# ---------------------------------------------------------------------------------------------------------
# The clients' key rules
# ---------------------------------------------------------------------------------------------------------

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_target(key: str, modules: set[str]) -> str | None:
    """The Stability module AUTOMATIC1111 applies a `lora_unet_...` key to, or None (it drops the key silently)."""
    network = {"diffusion_model_" + m.replace(".", "_"): m for m in modules}
    name, m = key, None

    def match(pattern):
        nonlocal m
        m = re.fullmatch(pattern, key)
        return m is not None

    if match(r"lora_unet_conv_in(.*)"):
        name = f"diffusion_model_input_blocks_0_0{m[1]}"
    elif match(r"lora_unet_conv_out(.*)"):
        name = f"diffusion_model_out_2{m[1]}"
    elif match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        name = f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    elif match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _A1111_RESNET.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        name = f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{int(m[2] == 'attentions')}_{suffix}"
    elif match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _A1111_RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        name = f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    elif match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _A1111_RESNET.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        name = f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{int(m[2] == 'attentions')}_{suffix}"
    elif match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        name = f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    elif match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        name = f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if name in network:
        return network[name]
    fallback = key.replace("lora_unet", "diffusion_model")  # "SDXL loras seem to already have correct compvis keys"
    return network.get(fallback)


def comfyui_key_map(unet) -> dict[str, str]:
    """`lora_unet_...` key -> the Stability module ComfyUI applies it to; a key not in it is "not loaded"."""
    key_map = {}
    for weight in unet.state_dict():
        module = weight.rpartition(".")[0]
        stability = kohya.ldm_module_name(module, unet.config)
        key_map["lora_unet_" + stability.replace(".", "_")] = stability
        key_map["lora_unet_" + module.replace(".", "_")] = stability
    return key_map


def a1111_version(metadata: dict[str, str]) -> str:
    """extensions-builtin/Lora/network.py::NetworkOnDisk.detect_version."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNETS)
def test_stability_names_are_what_diffusers_reads_stability_checkpoints_as(name):
    """Every UNet weight under its `ldm_module_name`, converted by diffusers' own single-file converter, comes back
    as the same weight: the name map agrees with the Stability layout on every module."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = UNETS[name]()
    state = unet.state_dict()
    checkpoint = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{kohya.ldm_module_name(module, unet.config)}.{param}"] = value
    back = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key].reshape(value.shape), value), key


@pytest.mark.parametrize("name, base, count", [("sd15", kohya.SD1, 282), ("sdxl", kohya.SDXL, 794)])
def test_every_module_of_the_kohya_file_reaches_its_module_in_both_clients(name, base, count):
    """At SD 1.5's and SDXL's block layouts, every LoRA module of the file (IO layers included) lands on its own
    Stability module in AUTOMATIC1111 and in ComfyUI, and diffusers' kohya reader maps it back to where it came from."""
    torch.manual_seed(0)
    unet = UNETS[name]()
    targets, comfyui = stability_modules(unet), comfyui_key_map(unet)
    modules = lora_modules(unet)
    assert len(modules) == count  # the real models' counts: 282 for SD 1.5, 794 for SDXL base
    assert kohya.base_model(unet.config) == base
    for module in modules:
        key = kohya.kohya_name(module, unet.config, base)
        expected = kohya.ldm_module_name(module, unet.config)
        assert a1111_target(key, targets) == expected, key
        assert comfyui.get(key) == expected, key
    peft_state = {k: v for k, v in get_peft_model_state_dict(unet).items()}
    pipeline = "StableDiffusionXLPipeline" if base == kohya.SDXL else "StableDiffusionPipeline"
    weights = kohya.kohya_state_dict(peft_state, 4, unet.config, base)
    kohya.check_round_trip(weights, peft_state, pipeline, unet.config)  # raises if any module comes back elsewhere
    assert len(weights) == 3 * count


def test_sdxl_under_diffusers_names_would_lose_three_modules_in_automatic1111():
    """Why SDXL files use Stability names: under diffusers names A1111's SD 1.x rules drop `add_embedding` (no rule)
    and the first up block's upsampler (SDXL's has an attention before it), silently."""
    torch.manual_seed(0)
    unet = sdxl_shaped_unet()
    targets = stability_modules(unet)
    lost = [m for m in lora_modules(unet) if a1111_target(kohya.kohya_name(m, unet.config, kohya.SD1), targets)
            != kohya.ldm_module_name(m, unet.config)]
    assert lost == ["add_embedding.linear_1", "add_embedding.linear_2", "up_blocks.0.upsamplers.0.conv"]


@pytest.mark.parametrize("cross, prediction, version, a1111, architecture", [
    (768, "epsilon", "sd_v1", "SD1", "stable-diffusion-v1/lora"),
    (1024, "epsilon", "sd_v2", "SD2", "stable-diffusion-v2-512/lora"),
    (1024, "v_prediction", "sd_v2_v", "SD2", "stable-diffusion-v2-768-v/lora"),
    (None, "epsilon", "sdxl_base_v1-0", "SDXL", "stable-diffusion-xl-v1-base/lora"),
])
def test_kohya_metadata_names_the_base_model_as_automatic1111_reads_it(cross, prediction, version, a1111,
                                                                        architecture):
    config = sdxl_shaped_unet().config if cross is None else sd15_shaped_unet(cross).config
    base = kohya.base_model(config)
    meta = kohya.kohya_metadata(8, 8, ("conv1", "to_q"), base, prediction, 512, "emd_t2i_generator")
    assert meta["ss_base_model_version"] == version and a1111_version(meta) == a1111
    assert meta["modelspec.architecture"] == architecture
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "8",
                                                                                             "8.0")
    assert meta["ss_v2"] == str(a1111 == "SD2")
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata is str -> str
