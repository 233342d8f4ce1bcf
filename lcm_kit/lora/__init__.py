"""LCM-LoRA: the adapter on a UNet (:mod:`~lcm_kit.lora.adapters`) and its files (:mod:`~lcm_kit.lora.files`).

``python -m lcm_kit.lora to-kohya IN OUT`` converts a file to the kohya-ss layout.
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
from .files import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, main, save_lora, to_kohya

__all__ = [
    "EMA_ADAPTER",
    "KOHYA_WEIGHT_NAME",
    "LCM_LORA_TARGET_MODULES",
    "LORA_WEIGHT_NAME",
    "adapter_mode",
    "adapter_state_dict",
    "add_ema_adapter",
    "add_lcm_lora",
    "lora_state_dict",
    "main",
    "make_lora_config",
    "save_lora",
    "teacher_mode",
    "to_kohya",
]
