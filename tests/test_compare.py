"""lcm_kit.compare on a tiny random SD folder: same-noise runs, agreement metrics, table and grid."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lcm_kit import LCMPipeline
from lcm_kit import compare as C
from lcm_kit.emoji import EmojiFeatureNet


@pytest.fixture(scope="module")
def runs(tiny_sd_dir):
    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    teacher.set_progress_bar_config(disable=True)
    student = LCMPipeline.from_pretrained(tiny_sd_dir)
    student.set_progress_bar_config(disable=True)
    prompts = ["red apple", "grinning face", "thumbs up", "rocket"]
    noise = C.initial_noise(len(prompts), (4, 8, 8), seed=0)
    ref = C.run_teacher(teacher, prompts, noise, "ddim", 10, 3.0)
    again = C.run_teacher(teacher, prompts, noise, "ddim", 10, 3.0)
    dpm = C.run_teacher(teacher, prompts, noise, "dpmpp", 4, 3.0)
    lcm = C.run_lcm(student, "LCM", prompts, noise, 2, 1.0)
    return prompts, ref, again, dpm, lcm


def test_initial_noise_is_per_example():
    a, b = C.initial_noise(3, (4, 2, 2), seed=5), C.initial_noise(5, (4, 2, 2), seed=5)
    assert torch.equal(a, b[:3])  # example i depends only on seed + i
    assert torch.equal(a[1], torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(6)))


def test_runs_and_scores(runs):
    prompts, ref, again, dpm, lcm = runs
    assert ref.latents.shape == (4, 4, 8, 8) and ref.images.shape == (4, 3, 16, 16)
    assert float(ref.images.min()) >= 0 and float(ref.images.max()) <= 1
    assert (ref.unet_evals, dpm.unet_evals, lcm.unet_evals) == (20, 8, 2)  # CFG doubles; LCM at scale 1 does not
    torch.manual_seed(0)
    net = EmojiFeatureNet(2, 3, feature_dim=8, resolution=16, width=8).eval()
    real = torch.rand(6, 3, 16, 16)
    C.score([ref, again, dpm, lcm], ref, real, net)
    # the same sampler from the same noise reproduces the reference exactly
    assert again.metrics["latent_mse"] == 0 and ref.metrics["latent_mse"] == 0
    assert dpm.metrics["latent_mse"] > 0 and lcm.metrics["latent_mse"] > 0
    # latent MSE is the plain mean of squared differences
    expected = float((lcm.latents.double() - ref.latents.double()).pow(2).mean())
    assert lcm.metrics["latent_mse"] == pytest.approx(expected)
    table = C.format_table([ref, dpm, lcm], "DDIM-10")
    assert table.count("\n") == 4 and "| LCM | 2 | 2 |" in table and "ref" in table.splitlines()[2]
    grid = C.comparison_grid([ref, dpm, lcm], prompts, n=4, scale=2)
    assert grid.size == (190 + 4 * 32, 3 * 32 + 14)


def test_bad_solver(runs, tiny_sd_dir):
    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    with pytest.raises(ValueError, match="euler"):
        C.run_teacher(teacher, ["a"], torch.zeros(1, 4, 8, 8), "euler", 4, 1.0)


def test_run_comparison_end_to_end(tiny_sd_dir, tiny_lcm_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from lcm_kit.emoji import build_emoji_dataset
    from lcm_kit.lora import add_lcm_lora, save_lora

    build_emoji_dataset(tmp_path / "data", size=16, limit=12, min_test=3)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    add_lcm_lora(unet, rank=2)
    save_lora(unet, tmp_path / "lora")
    net = EmojiFeatureNet(2, 3, feature_dim=8, resolution=16, width=8).eval()
    runs, prompts = C.run_comparison(tiny_sd_dir, tmp_path / "data", tmp_path / "lora", tiny_lcm_dir, num_eval=3,
                                     guidance_scale=2.0, feature_net=net, tcd_gammas=[0.0])  # fmt: skip
    assert len(prompts) == 3
    names = [(r.name, r.steps) for r in runs]
    label = {"ddim": "teacher DDIM", "dpmpp": "teacher DPM-Solver++"}
    assert names[:6] == [("teacher DDIM", 50)] + [(label[s], k) for s, k in C.TEACHER_FEW_STEP]
    rows = [[(n, k) for k in (1, 2, 4)] + [(f"{n}, TCD γ=0", k) for k in (2, 4)] for n in ("LCM-LoRA", "LCM (full)")]
    assert names[6:] == rows[0] + rows[1]
    assert all(set(r.metrics) >= {"latent_mse", "psnr_db", "fid_emoji", "kid_emoji", "speedup"} for r in runs)
    assert runs[0].metrics["latent_mse"] == 0 and runs[0].metrics["speedup"] == 1.0


def test_time_interleaved_rotates_order_and_takes_medians(monkeypatch):
    calls: list[str] = []
    clock = iter(range(1000))  # perf_counter: +1 s per reading, so every call lasts exactly 1 s
    monkeypatch.setattr(C.time, "perf_counter", lambda: float(next(clock)))

    def method(name: str) -> C.MethodResult:
        return C.MethodResult(name, 1, 1, torch.zeros(1), torch.zeros(1), 99.0, sample=lambda: calls.append(name))

    runs = [method("a"), method("b"), method("c")]
    C.time_interleaved(runs, rounds=3, n_images=4)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r.seconds_per_image for r in runs] == [0.25, 0.25, 0.25]
    C.time_interleaved(runs, rounds=0, n_images=4)  # no rounds: the times are kept
    assert len(calls) == 9 and runs[0].seconds_per_image == 0.25
