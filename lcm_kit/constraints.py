"""The constraint operators of zero-shot editing (Song et al. 2023, Consistency Models, Algorithm 4), for
:class:`lcm_kit.LCMEditPipeline`.

Each constraint has two projections: :meth:`Constraint.pixels`, exact, on decoded images ``(B, 3, H, W)`` in
[-1, 1] (the final projection of the returned image), and :meth:`Constraint.latents`, applied to each step's clean
latent estimate before it is re-noised: a VAE round trip ``encode(pixels(decode(z)))`` (encoder mode, no randomness).
Inpainting can instead paste the encoded image's latents where a whole latent cell is known (``latent_space``, no
VAE pass; with a VAE whose decoder mixes cells, e.g. through attention, the known pixels then drift), and with no
known pixel it is the identity, bit for bit.
The formulas are in :mod:`lcm_kit.functional`; argument checks in :mod:`lcm_kit.edit_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

from . import functional as F
from .pipeline_utils import expand_batch


def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``(B, C, h, w)`` to images ``(B, 3, H, W)`` in about [-1, 1]."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def vae_encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] to scaled latents: the posterior mode (deterministic, draws no noise)."""
    return retrieve_latents(vae.encode(images.to(vae.dtype)), sample_mode="argmax") * vae.config.scaling_factor


@dataclass(frozen=True, eq=False)
class Constraint:
    """No constraint (interpolation, text-to-image): both projections are the identity."""

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The exact projection of decoded images ``(B, 3, H, W)`` in [-1, 1]."""
        return images

    def latents(self, latents: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
        """The projection of a step's clean latent estimate ``(B, C, h, w)``: by default through the VAE."""
        return vae_encode(vae, self.pixels(vae_decode(vae, latents))).to(latents.dtype)

    def expand(self, batch_size: int, num_images_per_prompt: int) -> Constraint:
        """The constraint for ``batch_size`` prompts x ``num_images_per_prompt`` images: its tensors expanded as
        :func:`lcm_kit.pipeline_utils.expand_batch` does (1 image for all, one per prompt, or one per output)."""
        return self


@dataclass(frozen=True, eq=False)
class NoConstraint(Constraint):
    """The identity (interpolation): no VAE pass either."""

    def latents(self, latents: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
        return latents


@dataclass(frozen=True, eq=False)
class Inpaint(Constraint):
    """Keep the known pixels.

    Attributes:
        known: The input images ``(B, 3, H, W)`` in [-1, 1].
        mask: ``(B, 1, H, W)`` in {0, 1}, 1 = repaint (diffusers' convention).
        known_latents: ``encode(known)``, ``(B, C, h, w)``.
        latent_mask: ``(B, 1, h, w)``: 1 where any pixel of the latent cell is repainted (a latent is pasted only
            where its whole cell is known).
    """

    known: torch.Tensor
    mask: torch.Tensor
    known_latents: torch.Tensor
    latent_mask: torch.Tensor
    latent_space: bool = False

    @classmethod
    def build(cls, known: torch.Tensor, mask: torch.Tensor, vae: AutoencoderKL, vae_scale_factor: int,
              latent_space: bool = False) -> Inpaint:  # fmt: skip
        latent_mask = torch.nn.functional.max_pool2d(mask, vae_scale_factor)
        return cls(known, mask, vae_encode(vae, known), latent_mask, latent_space)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return F.project_known(images, self.known.to(images), self.mask.to(images))

    def latents(self, latents: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
        if self.latent_space:
            return F.project_known(latents, self.known_latents.to(latents), self.latent_mask.to(latents))
        if bool((self.mask == 1).all()):  # nothing known: the identity, without a VAE round trip
            return latents
        return super().latents(latents, vae)

    def expand(self, batch_size: int, num_images_per_prompt: int) -> Inpaint:
        tensors = (self.known, self.mask, self.known_latents, self.latent_mask)
        return Inpaint(*(expand_batch(x, batch_size, num_images_per_prompt) for x in tensors), self.latent_space)


@dataclass(frozen=True, eq=False)
class SuperResolution(Constraint):
    """The output's ``factor x factor`` box means equal ``low`` ``(B, 3, H / factor, W / factor)`` in [-1, 1]."""

    low: torch.Tensor
    factor: int

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return F.project_box_mean(images, self.low.to(images), self.factor)

    def expand(self, batch_size: int, num_images_per_prompt: int) -> SuperResolution:
        return SuperResolution(expand_batch(self.low, batch_size, num_images_per_prompt), self.factor)


@dataclass(frozen=True, eq=False)
class Colorization(Constraint):
    """The output's ITU-R 601 luma equals ``target`` ``(B, 1, H, W)`` in [-1, 1]."""

    target: torch.Tensor

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return F.project_luma(images, self.target.to(images))

    def expand(self, batch_size: int, num_images_per_prompt: int) -> Colorization:
        return Colorization(expand_batch(self.target, batch_size, num_images_per_prompt))


__all__ = ["Colorization", "Constraint", "Inpaint", "NoConstraint", "SuperResolution", "vae_decode", "vae_encode"]
