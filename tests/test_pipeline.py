"""LCMPipeline against stock diffusers on tiny SD folders (16x16 images, 8x8x4 latents).

The oracle for every number is a diffusers pipeline run in the test on the same components, seed and arguments:
``LatentConsistencyModelPipeline`` / ``...Img2ImgPipeline`` for an LCM UNet (``time_cond_proj_dim``), and
``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` + ``LCMScheduler`` for a plain UNet (diffusers' LCM
pipelines crash without a w-embedding).
"""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from lcm_kit import LCMKitScheduler, LCMPipeline

ATOL = 1e-4
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny (8x8 latents): a second thread buys nothing, and on a shared 2-core machine OpenMP
    # threads waiting on each other made every UNet call up to 100x slower (measured: 6 s vs 0.09 s per call).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lcm_pipe(tiny_lcm_dir):
    return _quiet(LCMPipeline.from_pretrained(tiny_lcm_dir))


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd_dir):
    return _quiet(LCMPipeline.from_pretrained(tiny_sd_dir))


def _reference(cls, pipe):
    """A stock diffusers pipeline on the same modules, with diffusers' own LCMScheduler from our config."""
    ref = cls(**pipe.components, requires_safety_checker=False)
    ref.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return _quiet(ref)


def _run(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


class UNetCalls:
    """Records the batch size of every UNet forward."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- equality with stock diffusers --------------------------------------------------------------------------------
SCHEDULES = [dict(num_inference_steps=1), dict(num_inference_steps=2), dict(num_inference_steps=4),
             dict(timesteps=[999, 749, 499, 249])]  # fmt: skip


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["1step", "2steps", "4steps", "custom"])
def test_text2img_matches_diffusers_lcm_pipeline(lcm_pipe, schedule):
    ref = _reference(LatentConsistencyModelPipeline, lcm_pipe)
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=6.0, **schedule)
    np.testing.assert_allclose(_run(lcm_pipe, **kwargs), _run(ref, **kwargs), atol=ATOL)


def test_default_guidance_matches_diffusers_lcm_default(lcm_pipe):
    ref = _reference(LatentConsistencyModelPipeline, lcm_pipe)  # diffusers' default guidance_scale is 8.5
    np.testing.assert_allclose(_run(lcm_pipe, prompt="a cat"), _run(ref, prompt="a cat"), atol=ATOL)
    assert not np.allclose(_run(lcm_pipe, prompt="a cat"), _run(lcm_pipe, prompt="a cat", guidance_scale=1.0))


@pytest.mark.parametrize(
    "schedule",
    [dict(num_inference_steps=1), dict(num_inference_steps=2), dict(num_inference_steps=4),
     dict(timesteps=[999, 759, 499, 259])],  # fmt: skip
    ids=["1step", "2steps", "4steps", "custom"],
)
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers_lcm_img2img(lcm_pipe, init_image, schedule, strength):
    ref = _reference(LatentConsistencyModelImg2ImgPipeline, lcm_pipe)
    kwargs = dict(prompt="a cat", image=init_image, strength=strength, **schedule)
    np.testing.assert_allclose(_run(lcm_pipe, **kwargs), _run(ref, **kwargs), atol=ATOL)


@pytest.mark.parametrize("guidance", [dict(guidance_scale=1.0), dict(guidance_scale=2.5, negative_prompt="blurry")])
@pytest.mark.parametrize("steps", [1, 4])
def test_plain_unet_matches_stable_diffusion_with_lcm_scheduler(sd_pipe, guidance, steps):
    ref = _reference(StableDiffusionPipeline, sd_pipe)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=steps, **guidance)
    ref_kwargs = {**kwargs, "negative_prompt": ["blurry"] * 2} if "negative_prompt" in kwargs else kwargs
    np.testing.assert_allclose(_run(sd_pipe, **kwargs), _run(ref, **ref_kwargs), atol=ATOL)  # ours broadcasts a str


def test_plain_unet_default_guidance_is_one(sd_pipe):
    ref = _reference(StableDiffusionPipeline, sd_pipe)
    expected = _run(ref, prompt="a cat", guidance_scale=1.0, num_inference_steps=4)
    np.testing.assert_allclose(_run(sd_pipe, prompt="a cat"), expected, atol=ATOL)


@pytest.mark.parametrize("guidance", [dict(guidance_scale=1.0), dict(guidance_scale=2.0, negative_prompt="blurry")])
@pytest.mark.parametrize("ours, theirs", [((4, 0.5), (8, 0.5)), ((2, 1.0), (2, 1.0))], ids=["half", "full"])
def test_plain_img2img_matches_sd_img2img(sd_pipe, init_image, guidance, ours, theirs):
    # SD img2img cuts the num_inference_steps grid by strength: 8 steps at 0.5 run [499, 379, 259, 139], the same
    # points as our 4 steps on the strength-cut grid (diffusers' LCM img2img meaning, documented in __call__).
    ref = _reference(StableDiffusionImg2ImgPipeline, sd_pipe)
    common = dict(prompt="a cat", image=init_image, **guidance)
    mine = _run(sd_pipe, num_inference_steps=ours[0], strength=ours[1], **common)
    np.testing.assert_allclose(mine, _run(ref, num_inference_steps=theirs[0], strength=theirs[1], **common), atol=ATOL)


def test_img2img_strength_half_runs_all_steps_on_cut_grid(lcm_pipe, init_image):
    seen = []
    lcm_pipe(prompt="a cat", image=init_image, strength=0.5, num_inference_steps=4, output_type="latent",
             callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or {})  # fmt: skip
    assert seen == [499, 379, 259, 139]  # LCM grid 1000 // 50: [19, ..., 999] cut at 25 points, every 6th


def test_image_input_types_agree(lcm_pipe, init_image):
    array = np.asarray(init_image, dtype=np.float32)[None] / 255  # (1, H, W, 3) in [0, 1]
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1  # (1, 3, H, W) in [-1, 1]
    kwargs = dict(prompt="a cat", strength=0.6, num_inference_steps=2)
    expected = _run(lcm_pipe, image=init_image, **kwargs)
    for image in (array, tensor):
        np.testing.assert_allclose(_run(lcm_pipe, image=image, **kwargs), expected, atol=1e-5)


@pytest.mark.parametrize("generators", [False, True], ids=["one_generator", "generator_list"])
@pytest.mark.parametrize("img2img", [False, True], ids=["text2img", "img2img"])
def test_batches_and_generators_match_diffusers(lcm_pipe, init_image, generators, img2img):
    cls = LatentConsistencyModelImg2ImgPipeline if img2img else LatentConsistencyModelPipeline
    extra = dict(image=init_image, strength=0.7) if img2img else {}
    kwargs = dict(prompt="a cat", num_images_per_prompt=2, num_inference_steps=2, output_type="np", **extra)

    def gen():
        return [torch.Generator().manual_seed(s) for s in (3, 4)] if generators else torch.Generator().manual_seed(3)

    mine, theirs = lcm_pipe(generator=gen(), **kwargs).images, _reference(cls, lcm_pipe)(generator=gen(), **kwargs)
    np.testing.assert_allclose(mine, theirs.images, atol=ATOL)
    assert not np.allclose(mine[0], mine[1], atol=ATOL)


# ---- UNet passes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "which, kwargs, batch",
    [
        ("lcm", dict(guidance_scale=8.5), 2),
        ("sd", dict(guidance_scale=1.0), 2),
        ("sd", dict(guidance_scale=2.0, negative_prompt="blurry"), 4),  # cond + uncond batched in one call
    ],
    ids=["w_embedding", "no_cfg", "cfg"],
)
def test_one_unet_call_per_step(lcm_pipe, sd_pipe, which, kwargs, batch):
    pipe = lcm_pipe if which == "lcm" else sd_pipe
    with UNetCalls(pipe.unet) as calls:
        pipe(prompt=PROMPTS, num_inference_steps=3, output_type="latent", **kwargs)
    assert calls.batches == [batch] * 3


def test_img2img_call_count(lcm_pipe, init_image):
    with UNetCalls(lcm_pipe.unet) as calls:
        lcm_pipe(prompt="a cat", image=init_image, strength=0.5, num_inference_steps=4, output_type="latent")
    assert calls.batches == [1] * 4


@pytest.mark.parametrize("which, reason", [("lcm", "w embedding"), ("sd", "guidance_scale=1.0 <= 1")])
def test_ignored_negative_prompt_warns(lcm_pipe, sd_pipe, which, reason):
    pipe = lcm_pipe if which == "lcm" else sd_pipe
    with pytest.warns(UserWarning, match=f"negative_prompt has no effect .*{reason}"):
        out = _run(pipe, prompt="a cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=1.0)
    np.testing.assert_array_equal(out, _run(pipe, prompt="a cat", num_inference_steps=2, guidance_scale=1.0))


@pytest.mark.parametrize("which", ["lcm", "sd"])
def test_non_finite_guidance_scale_is_rejected(lcm_pipe, sd_pipe, which):
    pipe = lcm_pipe if which == "lcm" else sd_pipe
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        pipe(prompt="a cat", num_inference_steps=1, guidance_scale=float("nan"), output_type="latent")


# ---- LoRA ----------------------------------------------------------------------------------------------------------
def test_lora_load_and_fuse(tiny_sd_dir, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = _quiet(LCMPipeline.from_pretrained(tiny_sd_dir))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    adapted.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=True))
    gen = torch.Generator().manual_seed(1)
    for name, param in adapted.unet.named_parameters():
        if "lora_B" in name:
            param.data = 0.2 * torch.randn(param.shape, generator=gen)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted.unet))

    pipe = _quiet(LCMPipeline.from_pretrained(tiny_sd_dir))
    kwargs = dict(prompt="a cat", num_inference_steps=2, guidance_scale=1.5)
    base = _run(pipe, **kwargs)
    pipe.load_lora_weights(tmp_path)
    lora = _run(pipe, **kwargs)
    assert np.abs(lora - base).max() > 1e-2
    np.testing.assert_allclose(_run(pipe, cross_attention_kwargs={"scale": 0.0}, **kwargs), base, atol=ATOL)
    np.testing.assert_allclose(lora, _run(adapted, **kwargs), atol=ATOL)  # every LoRA tensor was loaded
    pipe.fuse_lora()
    np.testing.assert_allclose(_run(pipe, **kwargs), lora, atol=ATOL)


# ---- loading and saving --------------------------------------------------------------------------------------------
def test_from_pretrained_swaps_scheduler(sd_pipe, tiny_sd_dir):
    folder_scheduler = PNDMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    assert isinstance(sd_pipe.scheduler, LCMKitScheduler)
    assert sd_pipe.scheduler.config.set_alpha_to_one is False
    torch.testing.assert_close(sd_pipe.scheduler.betas, folder_scheduler.betas, rtol=0, atol=0)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert sd_pipe.scheduler.config[key] == folder_scheduler.config[key]


def test_save_round_trip_through_lcm_pipeline_and_stock_diffusers(lcm_pipe, tmp_path):
    pipe = LCMPipeline(**lcm_pipe.components, requires_safety_checker=False)
    pipe.scheduler = LCMKitScheduler.from_config(pipe.scheduler.config, sigma_data=0.4)
    pipe.save_pretrained(tmp_path)
    ours = _quiet(LCMPipeline.from_pretrained(tmp_path))
    stock = _quiet(DiffusionPipeline.from_pretrained(tmp_path))
    assert type(stock) is LatentConsistencyModelPipeline and type(stock.scheduler) is LCMScheduler
    assert ours.scheduler.config.sigma_data == 0.4 and ours.scheduler.config.gamma is None
    kwargs = dict(prompt="a cat", num_inference_steps=2)
    expected = _run(_quiet(pipe), **kwargs)
    np.testing.assert_allclose(_run(ours, **kwargs), expected, atol=0)
    # Stock LCMScheduler ignores sigma_data (save_pretrained warns), but at the LCM timesteps s = 10 t >= 1390 the
    # boundary scalings move by < 1e-7 between sigma_data 0.4 and 0.5, so the images agree within ATOL.
    np.testing.assert_allclose(_run(stock, **kwargs), expected, atol=ATOL)


def test_save_plain_unet_loads_as_stable_diffusion(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path)
    stock = _quiet(StableDiffusionPipeline.from_pretrained(tmp_path))
    assert type(stock.scheduler) is LCMScheduler and stock.scheduler.config.set_alpha_to_one is False
    kwargs = dict(prompt="a cat", num_inference_steps=2, guidance_scale=2.0, negative_prompt="dark")
    np.testing.assert_allclose(_run(stock, **kwargs), _run(sd_pipe, **kwargs), atol=ATOL)
    np.testing.assert_allclose(_run(_quiet(LCMPipeline.from_pretrained(tmp_path)), **kwargs), _run(sd_pipe, **kwargs))


def test_stock_lcm_folder_loads_in_lcm_pipeline(lcm_pipe, tmp_path):
    stock = _reference(LatentConsistencyModelPipeline, lcm_pipe)
    stock.save_pretrained(tmp_path)
    ours = _quiet(LCMPipeline.from_pretrained(tmp_path))
    assert isinstance(ours.scheduler, LCMKitScheduler)
    kwargs = dict(prompt="a cat", num_inference_steps=4)
    np.testing.assert_allclose(_run(ours, **kwargs), _run(stock, **kwargs), atol=ATOL)


# ---- arguments -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, value",
    [
        (dict(height=17), "got 17 x 16"),
        (dict(width=15), "got 16 x 15"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
        (dict(num_inference_steps=51), "num_inference_steps (51)"),  # more than the 50 points of the original schedule
        (dict(num_inference_steps=5, original_inference_steps=4), "num_inference_steps (5)"),
        (dict(strength=0.5), "strength=0.5"),  # no image
        (dict(image="IMG", strength=0.0), "strength must be in (0, 1], got 0.0"),
        (dict(image="IMG", strength=1.5), "got 1.5"),
        (dict(prompt_embeds=torch.zeros(1, 77, 16)), "got both"),
        (dict(prompt=None), "got neither"),
        (dict(generator=[torch.Generator()] * 3), "3 generators"),
        (dict(callback_on_step_end_tensor_inputs=["latents", "noise"]), "noise"),
        (dict(output_type="jpg"), "jpg"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_value_error(lcm_pipe, init_image, kwargs, value):
    if kwargs.get("image") == "IMG":
        kwargs = {**kwargs, "image": init_image}
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=re.escape(value)):
        lcm_pipe(**kwargs)


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("pil", lambda x: len(x) == 6 and all(isinstance(i, PIL.Image.Image) and i.size == (16, 16) for i in x)),
        ("np", lambda x: x.shape == (6, 16, 16, 3) and 0 <= x.min() and x.max() <= 1),
        ("pt", lambda x: x.shape == (6, 3, 16, 16)),
        ("latent", lambda x: x.shape == (6, 4, 8, 8)),
    ],
)
def test_output_types_and_num_images_per_prompt(lcm_pipe, output_type, check):
    images = lcm_pipe(prompt=PROMPTS, num_images_per_prompt=3, num_inference_steps=1, output_type=output_type).images
    assert check(images)


def test_tuple_output(lcm_pipe):
    images, nsfw = lcm_pipe(prompt="a cat", num_inference_steps=1, output_type="latent", return_dict=False)
    assert images.shape == (1, 4, 8, 8) and nsfw is None


def test_latents_passthrough_and_generator_order(lcm_pipe):
    # The initial latents are the generator's first draw; the re-noising draws come after them from the same one.
    gen = torch.Generator().manual_seed(0)
    latents = randn_tensor((1, 4, 8, 8), generator=gen)
    out = lcm_pipe(prompt="a cat", num_inference_steps=3, latents=latents, generator=gen, output_type="np").images
    np.testing.assert_array_equal(out, _run(lcm_pipe, prompt="a cat", num_inference_steps=3))
    ref = _reference(LatentConsistencyModelPipeline, lcm_pipe)
    kwargs = dict(prompt="a cat", num_inference_steps=3, latents=latents, output_type="np")
    np.testing.assert_allclose(_run(lcm_pipe, seed=5, **kwargs), _run(ref, seed=5, **kwargs), atol=ATOL)


def test_callback_can_replace_latents(lcm_pipe):
    # Zeroing the latents after step 1 of [999, 499] makes step 2 (the last, which draws no noise) the same as a
    # single step at t=499 from zero latents.
    def zero_latents(pipe, i, t, tensors):
        assert set(tensors) == {"latents", "denoised"}
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 0 else {}

    kwargs = dict(prompt="a cat", output_type="np")
    out = _run(lcm_pipe, num_inference_steps=2, callback_on_step_end=zero_latents,
               callback_on_step_end_tensor_inputs=["latents", "denoised"], **kwargs)  # fmt: skip
    single = _run(lcm_pipe, timesteps=[499], latents=torch.zeros(1, 4, 8, 8), **kwargs)
    np.testing.assert_allclose(out, single, atol=1e-6)
    assert not np.allclose(out, _run(lcm_pipe, num_inference_steps=2, **kwargs), atol=ATOL)


def test_progress_bar_can_be_disabled(tiny_lcm_dir, capfd):
    pipe = LCMPipeline.from_pretrained(tiny_lcm_dir)
    capfd.readouterr()
    pipe(prompt="a cat", num_inference_steps=2, output_type="latent")
    assert "2/2" in capfd.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a cat", num_inference_steps=2, output_type="latent")
    assert "2/2" not in capfd.readouterr().err


def test_bf16_text_encoder_with_fp32_unet(tiny_lcm_dir):
    # training validation keeps the frozen text encoder in bf16 beside an fp32 UNet: the loop follows the UNet dtype
    pipe = LCMPipeline.from_pretrained(tiny_lcm_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pipe.text_encoder.to(torch.bfloat16)
    out = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert out.dtype == torch.float32
    # only the text embeddings were rounded to bf16 (8 mantissa bits): outputs agree to a few percent
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


# ---- image inputs (issue 11 items 3, 4, 13) -----------------------------------------------------------------------
IMG2IMG = dict(prompt="a cat", strength=0.6, num_inference_steps=2)


def _with_alpha(image: PIL.Image.Image, alpha: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.dstack([np.asarray(image), alpha.astype(np.uint8)]))


def test_rgba_and_cmyk_images_are_converted_to_rgb_not_taken_as_latents(lcm_pipe, init_image):
    expected = _run(lcm_pipe, image=init_image, **IMG2IMG)
    assert expected.shape == (1, 16, 16, 3)
    opaque = _with_alpha(init_image, np.full((16, 16), 255))
    np.testing.assert_array_equal(_run(lcm_pipe, image=opaque, **IMG2IMG), expected)  # was a 32x32 "latent" decode
    cmyk = init_image.convert("CMYK")
    np.testing.assert_array_equal(_run(lcm_pipe, image=cmyk, **IMG2IMG), _run(lcm_pipe, image=cmyk.convert("RGB"),
                                                                             **IMG2IMG))  # fmt: skip
    # a transparent image is flattened onto white (lcm_kit.images.to_rgb) before it is encoded
    alpha = np.tile(np.linspace(0, 255, 16), (16, 1)).round()
    rgb = np.asarray(init_image, dtype=np.float64)
    over_white = PIL.Image.fromarray(np.rint(rgb * alpha[..., None] / 255 + 255 * (1 - alpha[..., None] / 255))
                                     .astype(np.uint8))  # fmt: skip
    out = _run(lcm_pipe, image=_with_alpha(init_image, alpha), **IMG2IMG)
    np.testing.assert_allclose(out, _run(lcm_pipe, image=over_white, **IMG2IMG), atol=0.02)  # alpha_composite rounds


def test_numpy_rgba_is_flattened_onto_white(lcm_pipe, init_image):
    rgb = np.asarray(init_image, dtype=np.float32) / 255
    alpha = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))[..., None]
    out = _run(lcm_pipe, image=np.dstack([rgb, alpha]), **IMG2IMG)
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(out, _run(lcm_pipe, image=rgb * alpha + (1 - alpha), **IMG2IMG), atol=1e-6)


def test_16_bit_image_is_scaled_to_8_bits(lcm_pipe):
    values = np.random.default_rng(1).integers(0, 65536, (16, 16)).astype(np.uint16)
    sixteen = PIL.Image.frombytes("I;16", (16, 16), values.astype("<u2").tobytes())
    eight = PIL.Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB")  # 65535 -> 255
    np.testing.assert_array_equal(_run(lcm_pipe, image=sixteen, **IMG2IMG), _run(lcm_pipe, image=eight, **IMG2IMG))


def test_latents_tensor_as_image_is_kept_as_diffusers_does(lcm_pipe):
    # diffusers' VaeImageProcessor and LCM img2img take a 4-channel *tensor* as already-encoded latents; kept.
    latents = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = _reference(LatentConsistencyModelImg2ImgPipeline, lcm_pipe)
    out = _run(lcm_pipe, image=latents, **IMG2IMG)
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(out, _run(ref, image=latents, **IMG2IMG), atol=ATOL)


def test_numpy_hwc_image_needs_no_height_or_width(lcm_pipe, init_image):
    array = np.asarray(init_image, dtype=np.float32) / 255  # (H, W, 3), the documented format
    expected = _run(lcm_pipe, image=init_image, **IMG2IMG)
    np.testing.assert_allclose(_run(lcm_pipe, image=array, **IMG2IMG), expected, atol=1e-5)
    np.testing.assert_allclose(_run(lcm_pipe, image=[array], **IMG2IMG), expected, atol=1e-5)


def test_one_image_per_prompt_list(lcm_pipe, init_image):
    other = PIL.Image.fromarray(np.asarray(init_image)[::-1].copy())
    kwargs = dict(image=[init_image, other], prompt=PROMPTS, strength=0.6, num_inference_steps=2, output_type="np")

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = lcm_pipe(generator=gens(3, 4), **kwargs).images
    assert both.shape == (2, 16, 16, 3) and not np.allclose(both[0], both[1], atol=ATOL)
    ref = _reference(LatentConsistencyModelImg2ImgPipeline, lcm_pipe)
    np.testing.assert_allclose(both, ref(generator=gens(3, 4), **kwargs).images, atol=ATOL)
    for i, seed in enumerate((3, 4)):
        single = dict(kwargs, image=kwargs["image"][i], prompt=PROMPTS[i])
        np.testing.assert_allclose(both[i], lcm_pipe(generator=gens(seed)[0], **single).images[0], atol=ATOL)


class ModelCalls:
    """Counts forward calls of the UNet, the VAE encoder and decoder and the text encoder."""

    def __init__(self, pipe):
        self.calls = 0
        modules = (pipe.unet, pipe.vae.encoder, pipe.vae.decoder, pipe.text_encoder)
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    "kwargs, value",
    [
        (dict(height=-8), "height must be >= 1, got -8"),
        (dict(height=0), "height must be >= 1, got 0"),
        (dict(width=0, image="IMG"), "width must be >= 1, got 0"),
        (dict(height=16.0), "height must be an integer, got 16.0"),
        (dict(image="x.png"), "image must be a PIL image"),
        (dict(image=123), "got int 123"),
        (dict(image=[]), "got list []"),
        (dict(image=["IMG", np.zeros((16, 16, 3))]), "image must be"),  # mixed kinds
        (dict(image=np.zeros((16, 16, 3), dtype=np.uint8)), "dtype uint8"),
        (dict(image=np.zeros((16, 16, 2), dtype=np.float32)), "C = 3, 1 or 4"),
        (dict(image=torch.zeros(1, 2, 16, 16)), "(N, 3, H, W) pixels"),
        (dict(image=["IMG"] * 3, prompt=PROMPTS), "got 3 images in image for 2 prompt(s)"),
        (dict(latents=torch.zeros(3, 4, 8, 8)), "latents must have shape (1, 4, 8, 8)"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), "latents must have shape (1, 4, 8, 8)"),
        (dict(latents=torch.zeros(1, 4, 8, 8), height=32), "latents must have shape (1, 4, 16, 8)"),
        (dict(latents=np.zeros((1, 4, 8, 8))), "latents must be a tensor"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 12)), "prompt_embeds must be a tensor (batch, tokens, 16"),
        (dict(negative_prompt_embeds=torch.zeros(1, 77, 12)), "negative_prompt_embeds must be a tensor"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer, got 2.5"),
        (dict(num_inference_steps=51), "num_inference_steps (51)"),  # checked by the scheduler's grid
        (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer, got 1.5"),
        (dict(image="IMG", strength="0.5"), "strength must be in (0, 1]"),
    ],
)
def test_bad_inputs_raise_before_any_model_runs(lcm_pipe, init_image, kwargs, value):
    def fill(x):  # "IMG" stands for the init image (a fixture)
        return init_image if isinstance(x, str) and x == "IMG" else x

    image = kwargs.get("image")
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    kwargs["image"] = [fill(x) for x in image] if isinstance(image, list) else fill(image)
    with ModelCalls(lcm_pipe) as calls, pytest.raises(ValueError, match=re.escape(value)):
        lcm_pipe(**kwargs)
    assert calls.calls == 0
