"""LCMEditPipeline on tiny SD folders (16x16 images, 8x8x4 latents; random weights, so only the constraints, the
UNet-call counts and the identity case are meaningful, not the pictures).

Expected values: the constraint itself, computed in the test from the input (PIL's ``convert("L")`` for luma, a
numpy box mean for super-resolution, the input's pixels for inpainting), within 1/255 of 8-bit rounding; and
:class:`LCMPipeline` text-to-image from the same generator for the identity constraint.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lcm_kit import LCMEditPipeline, LCMKitScheduler, LCMPipeline, schedules
from lcm_kit import functional as F
from lcm_kit.constraints import vae_encode

PROMPT = "a red cat"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lcm_edit(tiny_lcm_dir):
    return _quiet(LCMEditPipeline.from_pretrained(tiny_lcm_dir))


@pytest.fixture(scope="module")
def sd_edit(tiny_sd_dir):
    return _quiet(LCMEditPipeline.from_pretrained(tiny_sd_dir))


@pytest.fixture(scope="module")
def photo():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def centre_mask():
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[4:12, 4:12] = 1.0
    return mask


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _u8(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def count_unet_calls(unet, batches: list[int]):
    """A forward pre-hook appending each UNet call's batch size to ``batches``; returns the handle."""
    return unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))


# ---- the projections (pure functions) -------------------------------------------------------------------------------
def test_projections_are_exact_and_in_range():
    g = _gen(1)
    x = 1.5 * torch.randn(2, 3, 16, 16, generator=g)  # far outside [-1, 1]: the range fit must keep the constraint
    low = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    sr = F.project_box_mean(x, low, 4)
    torch.testing.assert_close(F.box_downsample(sr, 4), low, atol=1e-6, rtol=0)
    grey = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    col = F.project_luma(x, grey)
    torch.testing.assert_close(F.luma(col), grey, atol=1e-6, rtol=0)
    for y in (sr, col):
        assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    # a constraint already met is kept as is (a projection is idempotent)
    torch.testing.assert_close(F.project_box_mean(sr, low, 4), sr, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.project_luma(col, grey), col, atol=1e-5, rtol=0)


def test_luma_is_pils_convert_L():
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ours = F.luma(torch.from_numpy(rgb).permute(2, 0, 1)[None].double())[0, 0].numpy()
    pil = np.asarray(PIL.Image.fromarray(rgb).convert("L")).astype(np.float64)
    assert np.abs(ours - pil).max() <= 0.5 + 1e-6  # PIL rounds the same weighted sum (fixed point)


def test_slerp_ends_and_norm():
    g = _gen(2)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    torch.testing.assert_close(F.slerp(a, b, 0.0), a)
    torch.testing.assert_close(F.slerp(a, b, 1.0), b)
    mid = F.slerp(a / a.norm(), b / b.norm(), 0.5)
    assert abs(float(mid.norm()) - 1.0) < 1e-5  # on the sphere, unlike lerp (norm cos(theta / 2) < 1)
    torch.testing.assert_close(F.slerp(a, a, 0.3), a)  # parallel ends: the linear fallback


def test_reproject_renoised_identity_is_bit_exact():
    g = _gen(3)
    renoised, denoised = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(F.reproject_renoised(renoised, denoised, denoised.clone(), 0.7), renoised)


# ---- each constraint holds exactly on the returned image ----------------------------------------------------------
@pytest.mark.parametrize("strength", [None, 0.6])
def test_inpaint_keeps_known_pixels(lcm_edit, photo, centre_mask, strength):
    out = lcm_edit.inpaint(PROMPT, image=photo, mask_image=centre_mask, num_inference_steps=2, strength=strength,
                           generator=_gen()).images[0]  # fmt: skip
    known = centre_mask == 0
    np.testing.assert_array_equal(_u8(out)[known], _u8(photo)[known])
    assert np.abs(_u8(out) - _u8(photo))[~known].mean() > 10  # the masked part is repainted
    loose = lcm_edit.inpaint(PROMPT, image=photo, mask_image=centre_mask, num_inference_steps=2, strength=strength,
                             generator=_gen(), exact_projection=False).images[0]  # fmt: skip
    assert np.abs(_u8(loose) - _u8(photo))[known].max() > 1  # without the final projection the VAE alters them


def test_super_resolve_box_mean_equals_input(lcm_edit):
    low = np.random.default_rng(4).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = lcm_edit.super_resolve(PROMPT, image=PIL.Image.fromarray(low), scale_factor=4, num_inference_steps=2,
                                 generator=_gen()).images[0]  # fmt: skip
    assert out.size == (16, 16)
    means = _u8(out).reshape(4, 4, 4, 4, 3).mean(axis=(1, 3))
    assert np.abs(means - low).max() <= 1.0


def test_colorize_luma_equals_input(lcm_edit, photo):
    grey = photo.convert("L")
    out = lcm_edit.colorize(PROMPT, image=grey, num_inference_steps=2, generator=_gen()).images[0]
    assert np.abs(_u8(out.convert("L")) - _u8(grey)).max() <= 1
    assert _u8(out).std(axis=-1).mean() > 1  # it has colour


def test_each_step_renoises_the_projected_estimate(lcm_edit, photo, centre_mask):
    """After step 0, ``latents = alpha(t1) P(denoised) + sigma(t1) eps1`` with the step's own noise ``eps1`` (the
    generator's second draw, after the initial noise), and ``P`` (``latent_projection``) pasted the encoded image into
    the known cells."""
    seen = {}

    def callback(pipe, i, t, tensors):
        seen.setdefault("t1", int(pipe.scheduler.timesteps[1]))
        seen.setdefault("step0", {k: v.clone() for k, v in tensors.items()})
        return {}

    inputs = ["latents", "denoised"]
    lcm_edit.inpaint(PROMPT, image=photo, mask_image=centre_mask, num_inference_steps=2, generator=_gen(7),
                     latent_projection=True, callback_on_step_end=callback,
                     callback_on_step_end_tensor_inputs=inputs)  # fmt: skip
    g = _gen(7)
    torch.randn(1, 4, 8, 8, generator=g)
    eps1 = torch.randn(1, 4, 8, 8, generator=g)
    alpha, sigma = schedules.alpha_sigma(lcm_edit.scheduler.alphas_cumprod, seen["t1"])
    step0 = seen["step0"]
    torch.testing.assert_close(step0["latents"], alpha * step0["denoised"] + sigma * eps1, atol=1e-5, rtol=1e-5)
    known = vae_encode(lcm_edit.vae, lcm_edit.image_processor.preprocess(photo))
    torch.testing.assert_close(step0["denoised"][..., :2, :], known[..., :2, :])  # latent rows 0-1: all known


# ---- UNet calls, identity, sharing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
def test_unet_calls_equal_num_inference_steps(sd_edit, photo, centre_mask, steps):
    grey, low = photo.convert("L"), photo.resize((4, 4))
    tasks = {
        "inpaint": lambda **kw: sd_edit.inpaint(PROMPT, image=photo, mask_image=centre_mask, **kw),
        "super_resolve": lambda **kw: sd_edit.super_resolve(PROMPT, image=low, scale_factor=4, **kw),
        "colorize": lambda **kw: sd_edit.colorize(PROMPT, image=grey, **kw),
        "interpolate": lambda **kw: sd_edit.interpolate(["a cat", "a dog"], num_frames=3, **kw),
    }
    for name, run in tasks.items():
        for scale, batch in ((1.0, 1), (2.0, 2)):  # CFG doubles the batch, not the passes
            batches: list[int] = []
            handle = count_unet_calls(sd_edit.unet, batches)
            try:
                run(num_inference_steps=steps, guidance_scale=scale, generator=_gen(), output_type="np")
            finally:
                handle.remove()
            frames = 3 if name == "interpolate" else 1
            assert batches == [batch * frames] * steps, (name, scale)


@pytest.mark.parametrize("which,scale", [("lcm", None), ("sd", 2.0)])
def test_all_repaint_mask_is_text_to_image_bit_for_bit(lcm_edit, sd_edit, photo, which, scale):
    edit = lcm_edit if which == "lcm" else sd_edit
    t2i = _quiet(LCMPipeline(**edit.components))
    kwargs = dict(num_inference_steps=3, guidance_scale=scale, num_images_per_prompt=2, output_type="np")
    ref = t2i([PROMPT, "a dog"], generator=_gen(5), height=16, width=16, **kwargs).images
    out = edit.inpaint([PROMPT, "a dog"], image=photo, mask_image=np.ones((16, 16)), generator=_gen(5),
                       **kwargs).images  # fmt: skip
    assert np.array_equal(out, ref)


def test_from_pipe_shares_components_and_callbacks_see_projected_tensors(lcm_edit, photo, centre_mask):
    base = _quiet(LCMPipeline(**lcm_edit.components))
    edit = LCMEditPipeline.from_pipe(base)
    assert isinstance(edit, LCMEditPipeline) and edit.unet is base.unet and edit.vae is base.vae
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, set(tensors)))
        return {}

    _quiet(edit).inpaint(PROMPT, image=photo, mask_image=centre_mask, num_inference_steps=3,
                         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["denoised"])  # fmt: skip
    assert seen == [(0, {"denoised"}), (1, {"denoised"}), (2, {"denoised"})]


def test_latent_projection_identity_and_image_interpolation(lcm_edit, photo):
    kwargs = dict(num_inference_steps=2, output_type="np")
    ref = _quiet(LCMPipeline(**lcm_edit.components))(PROMPT, height=16, width=16, generator=_gen(3), **kwargs).images
    everything = np.ones((16, 16))
    out = lcm_edit.inpaint(PROMPT, image=photo, mask_image=everything, latent_projection=True, generator=_gen(3),
                           **kwargs)  # fmt: skip
    assert np.array_equal(out.images, ref)  # an all-repaint mask is the identity in latent space too
    batches: list[int] = []
    handle = count_unet_calls(lcm_edit.unet, batches)
    try:
        ends = [photo, photo.transpose(PIL.Image.FLIP_LEFT_RIGHT)]
        frames = lcm_edit.interpolate(PROMPT, image=ends, num_frames=3, generator=_gen(3), **kwargs).images
    finally:
        handle.remove()
    assert frames.shape == (3, 16, 16, 3) and batches == [3, 3]  # strength 0.8 by default: still 2 passes


def test_interpolate_ends_do_not_depend_on_num_frames(lcm_edit):
    a = lcm_edit.interpolate(
        ["a cat", "a dog"], num_frames=2, num_inference_steps=2, generator=_gen(), output_type="np"
    )
    b = lcm_edit.interpolate(
        ["a cat", "a dog"], num_frames=4, num_inference_steps=2, generator=_gen(), output_type="np"
    )
    np.testing.assert_allclose(b.images[[0, -1]], a.images, atol=1e-5)
    assert not np.allclose(b.images[1], b.images[0], atol=1e-3)


# ---- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_naming_the_argument(lcm_edit, photo, centre_mask):
    cases = [
        (lambda: lcm_edit.inpaint(PROMPT, image=photo, mask_image=np.ones((8, 8))), "mask_image"),
        (lambda: lcm_edit.inpaint(PROMPT, image=photo, mask_image=centre_mask * 2), "mask_image"),
        (lambda: lcm_edit.inpaint(PROMPT, image=photo, mask_image=torch.full((1, 1, 16, 16), -0.5)), "mask_image"),
        (lambda: lcm_edit.inpaint(PROMPT, image=photo.resize((15, 16)), mask_image=np.ones((16, 15))), "image"),
        (
            lambda: lcm_edit.super_resolve(PROMPT, image=photo.resize((4, 4)), scale_factor=4, height=18),
            "scale_factor",
        ),
        (lambda: lcm_edit.super_resolve(PROMPT, image=photo.resize((4, 4)), scale_factor=2.5), "scale_factor"),
        (lambda: lcm_edit.super_resolve(PROMPT, image=photo.resize((3, 3)), scale_factor=3), "scale_factor"),
        (lambda: lcm_edit.colorize(PROMPT, image=photo), "image"),
        (lambda: lcm_edit.interpolate(["a", "b"], num_frames=1), "num_frames"),
        (lambda: lcm_edit.interpolate(["a", "b", "c"]), "prompt"),
        (lambda: lcm_edit.interpolate("a", generator=[_gen(), _gen()]), "generator"),
        (lambda: lcm_edit.inpaint(image=photo, mask_image=centre_mask), "prompt"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_tcd_scheduler_is_refused(lcm_edit, photo, centre_mask):
    edit = _quiet(LCMEditPipeline(**lcm_edit.components))
    edit.scheduler = LCMKitScheduler.from_config(edit.scheduler.config, gamma=0.3)
    with pytest.raises(ValueError, match="gamma"):
        edit.inpaint(PROMPT, image=photo, mask_image=centre_mask)
