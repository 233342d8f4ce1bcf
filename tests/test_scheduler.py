"""LCMKitScheduler against diffusers' LCMScheduler / TCDScheduler: same sampling loops, same configs."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler, TCDScheduler

from lcm_kit.scheduler import LCMKitScheduler
from lcm_kit.testing import SD15_SCHEDULER_CONFIG


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: a fixed channel mix of the input plus a timestep-dependent bias."""
    mix = torch.linspace(-1, 1, 16).reshape(4, 4)
    return 0.3 * torch.einsum("ij,bjhw->bihw", mix, x) + 1e-3 * float(t)


def run_loop(scheduler, set_kwargs: dict, step_kwargs: dict | None = None, x=None, seed: int = 0):
    scheduler.set_timesteps(**set_kwargs)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(42)) if x is None else x
    gen = torch.Generator().manual_seed(seed)
    denoised = None
    for t in scheduler.timesteps:
        x, denoised = scheduler.step(toy_model(x, t), t, x, generator=gen, return_dict=False, **(step_kwargs or {}))
    return x, denoised


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_loop_equals_diffusers_lcm(prediction_type, steps):
    ref = LCMScheduler(prediction_type=prediction_type)
    ours = LCMKitScheduler.from_config(ref.config)
    x_ref, d_ref = run_loop(ref, {"num_inference_steps": steps})
    x, d = run_loop(ours, {"num_inference_steps": steps})
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(d, d_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_loop_equals_diffusers_tcd(prediction_type, steps, gamma):
    ref = TCDScheduler(prediction_type=prediction_type)
    ours = LCMKitScheduler.from_config(ref.config, gamma=gamma)
    x_ref, d_ref = run_loop(ref, {"num_inference_steps": steps}, {"eta": gamma})
    x, d = run_loop(ours, {"num_inference_steps": steps})
    torch.testing.assert_close(d, d_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)


def test_gamma_zero_is_deterministic_and_gamma_none_is_not():
    """gamma = 0 never draws noise (the seed is irrelevant); plain LCM (None) re-noises with the generator."""
    det = [run_loop(LCMKitScheduler(gamma=0.0), {"num_inference_steps": 4}, seed=s)[0] for s in (0, 1)]
    assert torch.equal(det[0], det[1])
    lcm = [run_loop(LCMKitScheduler(), {"num_inference_steps": 4}, seed=s)[0] for s in (0, 1)]
    assert not torch.allclose(lcm[0], lcm[1])


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.3])
def test_strength_schedule_equals_diffusers(strength):
    ref, ours = LCMScheduler(), LCMKitScheduler()
    x_ref, d_ref = run_loop(ref, {"num_inference_steps": 4, "strength": strength})
    x, d = run_loop(ours, {"num_inference_steps": 4, "strength": strength})
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("timesteps", "strength"), [([999, 749, 499, 249], 1.0), ([999, 499, 259], 1.0)])
def test_custom_timesteps_equal_diffusers(timesteps, strength):
    ref, ours = LCMScheduler(), LCMKitScheduler()
    x_ref, d_ref = run_loop(ref, {"timesteps": timesteps, "strength": strength})
    x, d = run_loop(ours, {"timesteps": timesteps, "strength": strength})
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)


def test_custom_timesteps_with_strength_denoised_equals_diffusers():
    # diffusers keeps num_inference_steps = len(full custom list) after the strength cut, so its last step still
    # re-noises prev_sample; ours ends on the denoised latent. The decoded quantity, `denoised`, is the same.
    ref, ours = LCMScheduler(), LCMKitScheduler()
    _, d_ref = run_loop(ref, {"timesteps": [999, 749, 499, 249], "strength": 0.5})
    x, d = run_loop(ours, {"timesteps": [999, 749, 499, 249], "strength": 0.5})
    assert ours.timesteps.tolist() == [499, 249]
    torch.testing.assert_close(d, d_ref, atol=1e-6, rtol=0)
    assert torch.equal(x, d)


def test_config_round_trips(tmp_path):
    ours = LCMKitScheduler(prediction_type="v_prediction", timestep_scaling=5.0, gamma=0.2, sigma_data=0.4)
    theirs = LCMScheduler.from_config(ours.config)
    assert theirs.config.prediction_type == "v_prediction" and theirs.config.timestep_scaling == 5.0
    back = LCMKitScheduler.from_config(theirs.config)
    # diffusers warns about our extra keys but carries them in its config, so they survive the trip
    assert back.config.timestep_scaling == 5.0 and back.config.gamma == 0.2 and back.config.sigma_data == 0.4
    ours.save_pretrained(tmp_path)
    loaded = LCMKitScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    assert {k: loaded.config[k] for k in public} == public


@pytest.mark.parametrize("cls", [PNDMScheduler, DDPMScheduler, DDIMScheduler])
def test_from_stock_sd_scheduler_config(cls, tmp_path):
    stock = cls(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k in cls().config})
    stock.register_to_config(set_alpha_to_one=False)  # NOTES item 3: DDPM has no such argument
    stock.save_pretrained(tmp_path)
    ours = LCMKitScheduler.from_pretrained(tmp_path)
    assert ours.config.set_alpha_to_one is False
    torch.testing.assert_close(ours.alphas_cumprod, stock.alphas_cumprod)
    assert ours.timesteps.dtype == torch.long and len(ours) == 1000


def test_add_noise_and_velocity_equal_diffusers():
    ref, ours = LCMScheduler(), LCMKitScheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t))
    torch.testing.assert_close(ours.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="gamma"):
        LCMKitScheduler(gamma=1.5)
    with pytest.raises(ValueError, match="flow"):
        LCMKitScheduler(prediction_type="flow")
    s = LCMKitScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(4, timesteps=[999, 499])
    with pytest.raises(ValueError, match="strength"):
        s.set_timesteps(4, strength=0.0)
    with pytest.raises(ValueError, match="60"):
        s.set_timesteps(60)


def test_begin_index_for_img2img():
    s = LCMKitScheduler()
    s.set_timesteps(4)
    s.set_begin_index(2)
    x = torch.randn(1, 4, 2, 2)
    s.step(toy_model(x, 499), 499, x)
    assert s.step_index == 3


def test_scale_model_input_is_identity():
    x = torch.randn(1, 4, 2, 2)
    assert LCMKitScheduler().scale_model_input(x, 10) is x


# ---- public API parity with diffusers.LCMScheduler ----------------------------------------------------------------
def _public_names(cls, instance) -> set[str]:
    return {n for n in set(dir(cls)) | set(dir(instance)) if not n.startswith("_")}


def test_public_api_covers_diffusers_lcm_scheduler():
    theirs = _public_names(LCMScheduler, LCMScheduler())
    ours = _public_names(LCMKitScheduler, LCMKitScheduler())
    assert sorted(theirs - ours) == []
    for name in sorted(theirs):  # every method takes diffusers' parameter names, so calls written for it work
        ref = getattr(LCMScheduler, name, None)  # None: an instance attribute
        if inspect.isfunction(ref) or inspect.ismethod(ref):
            params = set(inspect.signature(getattr(LCMKitScheduler, name)).parameters)
            assert set(inspect.signature(ref).parameters) <= params, name


STATE = ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "timesteps", "init_noise_sigma", "order",
         "num_inference_steps", "custom_timesteps", "step_index", "begin_index")  # fmt: skip


def _assert_same_state(ours, ref):
    for name in STATE:
        a, b = getattr(ours, name), getattr(ref, name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        else:
            assert a == b, name


@pytest.mark.parametrize("config", [dict(), dict(set_alpha_to_one=False), dict(beta_schedule="linear"),
                                    dict(rescale_betas_zero_snr=True)])  # fmt: skip
@pytest.mark.parametrize("schedule", [dict(num_inference_steps=4), dict(num_inference_steps=3, strength=0.5),
                                      dict(timesteps=[999, 749, 499, 249])])  # fmt: skip
def test_state_equals_diffusers_through_a_loop(config, schedule):
    ref, ours = LCMScheduler(**config), LCMKitScheduler(**config)
    _assert_same_state(ours, ref)
    for s in (ref, ours):
        s.set_timesteps(**schedule)
    _assert_same_state(ours, ref)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        for s in (ref, ours):
            s.step(toy_model(x, t), t, x, generator=torch.Generator().manual_seed(1))
        _assert_same_state(ours, ref)


@pytest.mark.parametrize("schedule", [None, dict(num_inference_steps=4), dict(num_inference_steps=4, strength=0.5),
                                      dict(timesteps=[999, 749, 499, 249])])  # fmt: skip
def test_previous_timestep_equals_diffusers(schedule):
    ref, ours = LCMScheduler(), LCMKitScheduler()
    if schedule is not None:
        ref.set_timesteps(**schedule)
        ours.set_timesteps(**schedule)
    for t in ref.timesteps[:: 1 if schedule else 97]:
        for timestep in (t, int(t)):
            expected = ref.previous_timestep(timestep)
            assert int(ours.previous_timestep(timestep)) == int(expected)  # -1 after the last step
            assert type(ours.previous_timestep(timestep)) is type(expected)


def test_index_for_timestep_and_begin_index_equal_diffusers():
    # a repeated first timestep: diffusers starts from the second occurrence (img2img convention)
    schedule = torch.tensor([999, 999, 499, 259])
    ref, ours = LCMScheduler(), LCMKitScheduler()
    for t in (999, torch.tensor(499), 259):
        assert ours.index_for_timestep(t, schedule) == ref.index_for_timestep(t, schedule)
    for s in (ref, ours):
        s.set_timesteps(4)
        s.set_begin_index(2)
    _assert_same_state(ours, ref)
    assert ours.index_for_timestep(499) == ref.index_for_timestep(499) == 2


@pytest.mark.parametrize("timestep", [0, 1, 19, 499, 999, torch.tensor(259), torch.tensor([0, 139, 999])])
def test_boundary_scalings_method_equals_diffusers(timestep):
    ref, ours = LCMScheduler(), LCMKitScheduler()
    for a, b in zip(ours.get_scalings_for_boundary_condition_discrete(timestep),
                    ref.get_scalings_for_boundary_condition_discrete(timestep), strict=True):  # fmt: skip
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0)
    assert "sigma_data" not in vars(ours)  # ours reads the config; diffusers' getter sets self.sigma_data = 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_helpers_equal_diffusers_bit_for_bit(dtype):
    ref, ours = LCMScheduler(), LCMKitScheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g, dtype=dtype), torch.randn(3, 4, 4, 4, generator=g, dtype=dtype)
    t = torch.tensor([0, 400, 999])
    for name in ("add_noise", "get_velocity"):
        a, b = getattr(ours, name)(x0, eps, t), getattr(ref, name)(x0, eps, t)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert torch.equal(ours.scale_model_input(x0, 10), ref.scale_model_input(x0, 10))
