"""LCMXLPipeline against stock diffusers on tiny SDXL folders (16x16 images, 8x8x4 latents).

The oracle for every number is diffusers' ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` with
diffusers' ``LCMScheduler``, run in the test on the same components, seed and arguments (stock SDXL runs an
LCM-SDXL UNet's w-embedding itself, and classic CFG on a plain UNet).
"""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from test_pipeline import ModelCalls, UNetCalls, _quiet, _run

from lcm_kit import LCMKitScheduler, LCMPipeline, LCMXLPipeline

ATOL = 1e-4
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir, tiny_lcm_sdxl_dir):
    """``{"plain": ..., "lcm": ...}``: LCMXLPipelines on the plain and the w-embedding SDXL folder."""
    return {"plain": _quiet(LCMXLPipeline.from_pretrained(tiny_sdxl_dir)),
            "lcm": _quiet(LCMXLPipeline.from_pretrained(tiny_lcm_sdxl_dir))}  # fmt: skip


@pytest.fixture(scope="module")
def init_image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _reference(cls, pipe):
    """A stock diffusers SDXL pipeline on the same modules, with diffusers' own LCMScheduler from our config."""
    ref = cls(**pipe.components, add_watermarker=False)
    ref.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return _quiet(ref)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- equality with stock diffusers --------------------------------------------------------------------------------
GUIDANCE = [dict(guidance_scale=1.0), dict(guidance_scale=2.0), dict(guidance_scale=2.0, negative_prompt="blurry")]


@pytest.mark.parametrize("kind", ["lcm", "plain"])
@pytest.mark.parametrize("guidance", GUIDANCE, ids=["g1", "g2", "g2_negative"])
@pytest.mark.parametrize("steps", [1, 4])
def test_text2img_matches_stock_sdxl(pipes, kind, guidance, steps):
    # g2 without a negative prompt: SDXL's force_zeros_for_empty_prompt zeroes the unconditional embeddings (plain
    # UNet); with a w-embedding guidance 2 is w = 1 in the embedding and the negative prompt is unused (warns).
    pipe = pipes[kind]
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=steps, **guidance)
    with pytest.warns(UserWarning, match="negative_prompt has no effect") if kind == "lcm" and "negative_prompt" in \
            guidance else _no_warning():  # fmt: skip
        mine = _run(pipe, **kwargs)
    np.testing.assert_allclose(mine, _run(_reference(StableDiffusionXLPipeline, pipe), **kwargs), atol=ATOL)
    assert mine.shape == (4, 16, 16, 3) and not np.allclose(mine[0], mine[2], atol=ATOL)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_guidance_changes_the_images(pipes):
    for pipe in pipes.values():
        one, two = (_run(pipe, prompt="a cat", guidance_scale=g) for g in (1.0, 2.0))
        assert not np.allclose(one, two, atol=ATOL)


@pytest.mark.parametrize("kind", ["lcm", "plain"])
@pytest.mark.parametrize("guidance", [dict(guidance_scale=1.0), dict(guidance_scale=2.0)], ids=["g1", "g2"])
@pytest.mark.parametrize("ours, theirs", [((4, 0.5), (8, 0.5)), ((1, 1.0), (1, 1.0))], ids=["half", "full"])
def test_img2img_matches_stock_sdxl_img2img(pipes, init_image, kind, guidance, ours, theirs):
    # SDXL img2img cuts the num_inference_steps grid by strength: 8 steps at 0.5 run [499, 379, 259, 139], the same
    # points as our 4 steps on the strength-cut grid (diffusers' LCM img2img meaning, as LCMPipeline).
    pipe = pipes[kind]
    common = dict(prompt=PROMPTS, image=init_image, **guidance)
    mine = _run(pipe, num_inference_steps=ours[0], strength=ours[1], **common)
    ref = _reference(StableDiffusionXLImg2ImgPipeline, pipe)
    np.testing.assert_allclose(mine, _run(ref, num_inference_steps=theirs[0], strength=theirs[1], **common), atol=ATOL)


@pytest.mark.parametrize("generators", [False, True], ids=["one_generator", "generator_list"])
@pytest.mark.parametrize("img2img", [False, True], ids=["text2img", "img2img"])
@pytest.mark.parametrize("kind", ["lcm", "plain"])
def test_batches_and_generators_match_stock(pipes, init_image, kind, generators, img2img):
    pipe = pipes[kind]
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    common = dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=2.0, output_type="np")
    ours_kw, theirs_kw = (dict(common, image=init_image, num_inference_steps=n, strength=0.5) if img2img
                          else dict(common, num_inference_steps=2) for n in (2, 4))  # fmt: skip

    def gen():
        return _gens(3, 4, 5, 6) if generators else torch.Generator().manual_seed(3)

    mine = pipe(generator=gen(), **ours_kw).images
    np.testing.assert_allclose(mine, _reference(cls, pipe)(generator=gen(), **theirs_kw).images, atol=ATOL)
    assert not np.allclose(mine[0], mine[1], atol=ATOL)
    if generators:  # each image depends on its own generator only
        single = pipe(generator=_gens(4)[0], **dict(ours_kw, prompt=PROMPTS[0], num_images_per_prompt=1)).images
        np.testing.assert_allclose(mine[1], single[0], atol=ATOL)


def test_default_guidance(pipes):
    lcm, plain = pipes["lcm"], pipes["plain"]
    ref = _reference(StableDiffusionXLPipeline, lcm)
    np.testing.assert_allclose(_run(lcm, prompt="a cat"), _run(ref, prompt="a cat", guidance_scale=8.5,
                                                                 num_inference_steps=4), atol=ATOL)  # fmt: skip
    ref = _reference(StableDiffusionXLPipeline, plain)
    np.testing.assert_allclose(_run(plain, prompt="a cat"), _run(ref, prompt="a cat", guidance_scale=1.0,
                                                                   num_inference_steps=4), atol=ATOL)  # fmt: skip


def test_size_conditioning_and_second_prompts_match_stock(pipes):
    pipe = pipes["plain"]
    kwargs = dict(prompt="a cat", prompt_2="a photo", negative_prompt="dark", negative_prompt_2="grey",
                  guidance_scale=2.0, num_inference_steps=2, original_size=(64, 48), crops_coords_top_left=(8, 4),
                  target_size=(32, 32))  # fmt: skip
    mine = _run(pipe, **kwargs)
    np.testing.assert_allclose(mine, _run(_reference(StableDiffusionXLPipeline, pipe), **kwargs), atol=ATOL)
    for key in ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left"):
        assert not np.allclose(mine, _run(pipe, **{k: v for k, v in kwargs.items() if k != key}), atol=ATOL), key


def test_prompt_embeds_give_the_prompt_images(pipes):
    pipe = pipes["plain"]
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a cat", negative_prompt="dark")
    kwargs = dict(guidance_scale=2.0, num_inference_steps=2)
    expected = _run(pipe, prompt="a cat", negative_prompt="dark", **kwargs)
    mine = _run(pipe, prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                negative_pooled_prompt_embeds=uncond_pooled, **kwargs)  # fmt: skip
    np.testing.assert_allclose(mine, expected, atol=1e-6)


# ---- UNet passes, callbacks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, kwargs, batch",
    [("lcm", dict(guidance_scale=8.5), 2), ("plain", dict(guidance_scale=1.0), 2),
     ("plain", dict(guidance_scale=2.0, negative_prompt="blurry"), 4)],  # fmt: skip
    ids=["w_embedding", "no_cfg", "cfg"],
)
def test_one_unet_call_per_step(pipes, kind, kwargs, batch):
    with UNetCalls(pipes[kind].unet) as calls:
        pipes[kind](prompt=PROMPTS, num_inference_steps=3, output_type="latent", **kwargs)
    assert calls.batches == [batch] * 3


def test_callback_sees_sdxl_tensors_batched_as_the_unet_call(pipes):
    seen = {}

    def record(pipe, i, t, tensors):
        seen.update({k: tuple(v.shape) for k, v in tensors.items()})
        return {}

    pipes["plain"](prompt=PROMPTS, guidance_scale=2.0, num_inference_steps=1, output_type="latent",
                   callback_on_step_end=record, callback_on_step_end_tensor_inputs=["add_text_embeds", "add_time_ids"])
    assert seen == {"add_text_embeds": (4, 8), "add_time_ids": (4, 6)}  # [uncond, cond] x 2 prompts; projection 8


# ---- fp16 VAE ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img2img", [False, True], ids=["text2img", "img2img"])
def test_fp16_vae_with_force_upcast_runs_in_fp32(tiny_sdxl_dir, init_image, img2img):
    # SDXL's VAE config sets force_upcast: an fp16 VAE encodes / decodes in fp32 (fp16 would overflow on real SDXL).
    # Reference: the same fp16-rounded weights run in fp32; a VAE computing in fp16 misses it by ~1e-3.
    pipe = _quiet(LCMXLPipeline.from_pretrained(tiny_sdxl_dir))
    pipe.vae.to(torch.float16)
    kwargs = dict(prompt="a cat", num_inference_steps=2, **(dict(image=init_image, strength=0.5) if img2img else {}))
    mine = _run(pipe, **kwargs)
    assert pipe.vae.dtype == torch.float16  # put back after use
    pipe.vae.to(torch.float32)
    np.testing.assert_allclose(mine, _run(pipe, **kwargs), atol=1e-6)


# ---- loading and saving --------------------------------------------------------------------------------------------
def test_save_pretrained_loads_in_stock_sdxl(pipes, tmp_path):
    for kind, pipe in pipes.items():
        pipe.save_pretrained(tmp_path / kind)
        stock = _quiet(StableDiffusionXLPipeline.from_pretrained(tmp_path / kind, add_watermarker=False))
        assert type(stock.scheduler) is LCMScheduler and stock.scheduler.config.set_alpha_to_one is False
        kwargs = dict(prompt="a cat", num_inference_steps=2, guidance_scale=2.0)
        np.testing.assert_allclose(_run(stock, **kwargs), _run(pipe, **kwargs), atol=ATOL)
        again = _quiet(LCMXLPipeline.from_pretrained(tmp_path / kind))
        np.testing.assert_allclose(_run(again, **kwargs), _run(pipe, **kwargs), atol=1e-6)


def test_from_pipe_of_stock_sdxl(tiny_lcm_sdxl_dir):
    stock = _quiet(StableDiffusionXLPipeline.from_pretrained(tiny_lcm_sdxl_dir, add_watermarker=False))
    ours = _quiet(LCMXLPipeline.from_pipe(stock))
    assert isinstance(ours.scheduler, LCMKitScheduler) and ours.unet is stock.unet
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    kwargs = dict(prompt="a cat", num_inference_steps=4, guidance_scale=3.0)
    np.testing.assert_allclose(_run(ours, **kwargs), _run(stock, **kwargs), atol=ATOL)


def test_load_lora_weights_as_stock_sdxl(tiny_sdxl_dir, tmp_path):
    # An LCM-LoRA on the plain SDXL UNet (random, non-zero B), saved in diffusers' SDXL LoRA format.
    pipe = _quiet(LCMXLPipeline.from_pretrained(tiny_sdxl_dir))
    kwargs = dict(prompt="a cat", num_inference_steps=2, guidance_scale=1.0)  # stock SDXL's default is 5
    before = _run(pipe, **kwargs)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # fmt: skip
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    pipe = _quiet(LCMXLPipeline.from_pretrained(tiny_sdxl_dir))
    pipe.load_lora_weights(tmp_path)
    stock = _quiet(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False))
    stock.load_lora_weights(tmp_path)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    mine = _run(pipe, **kwargs)
    np.testing.assert_allclose(mine, _run(stock, **kwargs), atol=ATOL)
    assert not np.allclose(mine, before, atol=ATOL)


def test_sd_folder_is_refused_with_a_pointer_to_lcm_pipeline(tiny_sd_dir):
    with pytest.raises(ValueError, match=r"not an SDXL folder.*addition_embed_type=None.*LCMPipeline"):
        LCMXLPipeline.from_pretrained(tiny_sd_dir)
    assert isinstance(LCMPipeline.from_pretrained(tiny_sd_dir), LCMPipeline)


# ---- arguments -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, value",
    [
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32)), "prompt_embeds needs pooled_prompt_embeds"),
        (dict(negative_prompt_embeds=torch.zeros(1, 77, 32)), "negative_prompt_embeds needs negative_pooled"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 32), pooled_prompt_embeds=torch.zeros(1, 8)),
         "pooled_prompt_embeds must be a tensor (2, projection_dim), got (1, 8)"),
        (dict(prompt=PROMPTS, prompt_2=["a", "b", "c"]), "prompt_2 has 3 prompts for a batch of 2"),
        (dict(negative_prompt_2=3), "negative_prompt_2 must be a string"),
        (dict(height=17), "got 17 x 16"),
        (dict(prompt_embeds=torch.zeros(1, 77, 16), prompt=None), "prompt_embeds must be a tensor (batch, tokens, 32"),
    ],
)
def test_bad_inputs_raise_before_any_model_runs(pipes, kwargs, value):
    pipe = pipes["plain"]
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with ModelCalls(pipe) as calls, pytest.raises(ValueError, match=re.escape(value)):
        pipe(**kwargs)
    assert calls.calls == 0


def test_lcm_kit_lora_loads_completely_and_applies_its_sampling_contract(tiny_sdxl_dir, tmp_path):
    # lcm_kit's LoRA file (kohya layout) with a sampling contract in its metadata, on the plain SDXL UNet.
    from diffusers import UNet2DConditionModel

    from lcm_kit import SamplingContract
    from lcm_kit.lora import add_lcm_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    torch.manual_seed(0)
    add_lcm_lora(unet, rank=4)
    with torch.no_grad():  # a non-zero B, so the LoRA changes the images
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    contract = SamplingContract("pcm", 2, (999, 499), {"gamma": 0.0, "original_inference_steps": 50}, (1.0, 1.0))
    save_lora(unet, tmp_path, metadata=contract.as_metadata())
    pipe = _quiet(LCMXLPipeline.from_pretrained(tiny_sdxl_dir))
    before, plain = pipe.scheduler, _run(pipe, prompt="a cat")
    pipe.load_lora_weights(tmp_path)
    def lora_modules(model):  # module paths, without the adapter's name
        return sorted(n.replace(".default_0.", ".").replace(".default.", ".") for n, _ in model.named_parameters()
                      if "lora_" in n)  # fmt: skip

    assert lora_modules(pipe.unet) == lora_modules(unet)  # every tensor loaded
    assert pipe.scheduler.config.sampling_contract == contract.to_dict()
    default = _run(pipe, prompt="a cat")
    assert pipe.scheduler.timesteps.tolist() == [999, 499] and not np.allclose(default, plain, atol=ATOL)
    manual = LCMKitScheduler.from_config(before.config, gamma=0.0)
    pipe.scheduler, contract_scheduler = manual, pipe.scheduler
    np.testing.assert_allclose(default, _run(pipe, prompt="a cat", timesteps=[999, 499]), atol=1e-6)
    pipe.scheduler = contract_scheduler
    pipe.unload_lora_weights()
    assert pipe.scheduler is before
    np.testing.assert_allclose(_run(pipe, prompt="a cat"), plain, atol=1e-6)
