"""LCM-LoRA: the adapter on a UNet (:mod:`~lcm_kit.lora.adapters`) and its files (:mod:`~lcm_kit.lora.files`).

The default file ``pytorch_lora_weights.safetensors`` is in the kohya-ss layout (ComfyUI, A1111, kohya sd-scripts and
diffusers load it); ``python -m lcm_kit.lora to-kohya IN OUT`` converts an older PEFT-layout file.
"""

from .adapters import (
    EMA_ADAPTER,
    LCM_LORA_TARGET_MODULES,
    adapter_mode,
    adapter_state_dict,
    add_ema_adapter,
    add_lcm_lora,
    lora_state_dict,
    make_lora_config,
    teacher_mode,
)
from .files import LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, kohya_state_dict, main, save_lora, to_kohya, to_peft

__all__ = [
    "EMA_ADAPTER",
    "LCM_LORA_TARGET_MODULES",
    "LORA_WEIGHT_NAME",
    "PEFT_WEIGHT_NAME",
    "adapter_mode",
    "adapter_state_dict",
    "add_ema_adapter",
    "add_lcm_lora",
    "kohya_state_dict",
    "lora_state_dict",
    "main",
    "make_lora_config",
    "save_lora",
    "teacher_mode",
    "to_kohya",
    "to_peft",
]
