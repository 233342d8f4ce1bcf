"""The per-frame path of the live demo, without any web framework: load a student once, then turn a prompt and a
sketch (or nothing, or an image and a mask) into one image as fast as the models allow.

What a frame runs is kept to the model forwards (VAE encode for a sketch or an inpainting frame, ``steps`` UNet
passes, VAE decode): the pipeline and its scheduler are built once in :meth:`FrameEngine.load`, the progress bar is
off, and the text embeddings of a prompt are computed once and reused (:meth:`FrameEngine.embeddings`). Bad input
is a ``ValueError`` naming what is wrong, raised before any model runs; the web page shows its message.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .. import guidance as G
from ..edit import LCMEditPipeline

MAX_STEPS = 4  # the demo's slider range: 1-4 consistency steps
EMBEDDING_CACHE_SIZE = 256  # prompts kept (typing a prompt live makes one entry per keystroke)


@dataclass(frozen=True)
class Frame:
    """One generated frame.

    Attributes:
        image: The model's output image (its native size, e.g. 32x32 for the emoji students).
        seconds: Wall time of the frame, from the canvas to the decoded image.
        unet_passes: UNet forwards the frame ran.
    """

    image: Image.Image
    seconds: float
    unet_passes: int

    def caption(self) -> str:
        """The line the page shows under the image."""
        return f"{self.seconds * 1000:.1f} ms per frame ({self.unet_passes} UNet passes, {self.image.width}x" \
               f"{self.image.height} px)"  # fmt: skip


class FramePipeline(LCMEditPipeline):
    """An :class:`lcm_kit.LCMEditPipeline` whose models stay where they were loaded (no offloading, no ``.to()``
    later): its execution device is looked up once. diffusers' ``_execution_device`` walks every module of every
    component for offload hooks on each call, about 6 ms on the emoji student here (a tenth of a 1-step frame)."""

    @property
    def _execution_device(self) -> torch.device:
        device = self.__dict__.get("_fixed_device")
        if device is None:
            device = self.__dict__["_fixed_device"] = LCMEditPipeline._execution_device.fget(self)
        return device


def check_model_folder(path: str | Path, name: str = "model") -> Path:
    """``path`` as a ``Path`` if it is a diffusers pipeline folder (has ``model_index.json``); else a ValueError."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{name}: folder {str(folder)!r} does not exist")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{name}: {str(folder)!r} is not a diffusers pipeline folder (no model_index.json)")
    return folder


def check_lora(path: str | Path) -> Path:
    """``path`` if it is a LoRA safetensors file or a folder holding one, else a ``ValueError`` naming it."""
    lora = Path(path)
    if lora.is_file() and lora.suffix == ".safetensors":
        return lora
    if lora.is_dir() and any(lora.glob("*.safetensors")):
        return lora
    raise ValueError(f"lora: {str(lora)!r} is neither a .safetensors file nor a folder holding one")


def check_steps(steps: int) -> int:
    """``steps`` as an int in ``1..MAX_STEPS`` (a ``ValueError`` otherwise)."""
    if int(steps) != steps or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps}")
    return int(steps)


class FrameEngine:
    """One loaded student and its per-prompt embedding cache; each method makes one frame.

    Args:
        pipe: An :class:`lcm_kit.LCMEditPipeline` (a full LCM, or a teacher with an LCM-LoRA).
        guidance_scale: Guidance for every frame (``None``: :func:`default_guidance_scale`).
    """

    def __init__(self, pipe: LCMEditPipeline, guidance_scale: float | None = None) -> None:
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.guidance_scale = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
        self.guidance = G.Guidance.decide(pipe.unet.config, self.guidance_scale)
        self.size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        # editing needs plain LCM sampling: a TCD student (gamma set) inpaints with gamma=None, built here once
        gamma = pipe.scheduler.config.gamma
        self._edit_scheduler = pipe.scheduler if gamma is None else type(pipe.scheduler).from_config(
            pipe.scheduler.config, gamma=None)  # fmt: skip
        self._embeddings: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    @classmethod
    def load(cls, model: str | Path, lora: str | Path | None = None,
             guidance_scale: float | None = None) -> FrameEngine:  # fmt: skip
        """Loads a full LCM folder, or a teacher folder plus an LCM-LoRA (fused into the UNet: no adapter cost per
        frame). Missing or wrong paths are a ``ValueError`` before anything loads."""
        folder = check_model_folder(model)
        lora_path = None if lora is None else check_lora(lora)
        pipe = FramePipeline.from_pretrained(folder)
        if lora_path is not None:
            pipe.load_lora_weights(lora_path)
            pipe.fuse_lora()
        return cls(pipe, guidance_scale)

    def embeddings(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cond, uncond)`` text embeddings of ``prompt``, computed once per prompt (``uncond`` only with CFG)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty: type what to draw (e.g. 'red apple')")
        cached = self._embeddings.get(prompt)
        if cached is None:
            pipe = self.pipe
            pipe._cross_attention_kwargs = None  # set per call by LCMPipeline.__call__; the demo passes none
            cached = pipe._encode_text(prompt, None, None, None, 1, self.guidance, None, pipe._execution_device)
            self._embeddings[prompt] = cached
            while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
                self._embeddings.popitem(last=False)
        self._embeddings.move_to_end(prompt)
        return cached

    def text_to_image(self, prompt: str, steps: int, seed: int) -> Frame:
        """Text-to-image in ``steps`` consistency steps."""
        steps = check_steps(steps)
        return self._timed(steps, lambda kw: self.pipe(**kw), prompt, steps, seed)

    def sketch_to_image(self, sketch: Image.Image, prompt: str, strength: float, steps: int, seed: int) -> Frame:
        """Image-to-image from ``sketch`` (RGB at the model's size, see :func:`lcm_kit.demo.canvas.sketch_image`):
        ``steps`` UNet passes on the first ``strength`` of the schedule."""
        steps = check_steps(steps)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return self._timed(steps, lambda kw: self.pipe(image=sketch, strength=strength, **kw), prompt, steps, seed)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, steps: int, seed: int) -> Frame:
        """Repaints the white part of ``mask`` in ``image`` (both at the model's size, see
        :func:`lcm_kit.demo.canvas.inpaint_inputs`) with :meth:`lcm_kit.LCMEditPipeline.inpaint`."""
        steps = check_steps(steps)
        sampling, self.pipe.scheduler = self.pipe.scheduler, self._edit_scheduler
        try:
            return self._timed(steps, lambda kw: self.pipe.inpaint(image=image, mask_image=mask, **kw), prompt,
                               steps, seed)  # fmt: skip
        finally:
            self.pipe.scheduler = sampling

    def _timed(self, steps: int, run, prompt: str, num_inference_steps: int, seed: int) -> Frame:
        start = time.perf_counter()
        cond, uncond = self.embeddings(prompt)
        kwargs = dict(
            prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=num_inference_steps,
            guidance_scale=self.guidance_scale, generator=torch.Generator().manual_seed(int(seed)),
        )  # fmt: skip
        image = run(kwargs).images[0]
        passes = steps * (2 if self.guidance.do_cfg else 1)
        return Frame(image, time.perf_counter() - start, passes)


def default_guidance_scale(pipe: LCMEditPipeline) -> float:
    """The middle of the guidance range a student was distilled for (its sampling contract's ``w_range``, LCM
    convention ``w = guidance_scale - 1``) when its UNet takes a ``w`` embedding; else the pipeline's default (1.0
    for a plain UNet with an LCM-LoRA: no CFG, one pass a step)."""
    stored = getattr(pipe.scheduler.config, "sampling_contract", None) or {}
    w_range = stored.get("w_range")
    if pipe.has_w_embedding and w_range:
        return 1.0 + (float(w_range[0]) + float(w_range[1])) / 2
    return pipe.default_guidance_scale()


__all__ = ["Frame", "FrameEngine", "MAX_STEPS", "check_lora", "check_model_folder", "default_guidance_scale"]
