"""lcm_kit.compare on a tiny random SD folder: same-noise runs, agreement metrics, table and grid."""

from __future__ import annotations

import dataclasses

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

    from lcm_kit.emoji import build_emoji_dataset, held_out
    from lcm_kit.lora import add_lcm_lora, save_lora

    build_emoji_dataset(tmp_path / "data", size=16, limit=12, min_test=3)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    add_lcm_lora(unet, rank=2)
    save_lora(unet, tmp_path / "lora")
    net = EmojiFeatureNet(2, 3, feature_dim=8, resolution=16, width=8).eval()
    prompts, real = held_out(tmp_path / "data", 3)
    runs = C.run_comparison(tiny_sd_dir, prompts, real, net, {"lora": tmp_path / "lora"}, {"full": tiny_lcm_dir},
                            guidance_scale=2.0, tcd_gammas=[0.0])  # fmt: skip
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


def test_teacher_lcm_baseline_and_several_students(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from lcm_kit.lora import add_lcm_lora, save_lora

    loras = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
        add_lcm_lora(unet, rank=2)
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.data = 0.05 * torch.randn_like(param)  # a non-zero adapter, different per seed
        save_lora(unet, tiny_sd_dir.parent / f"lora_seed{seed}")
        loras[f"seed{seed}"] = tiny_sd_dir.parent / f"lora_seed{seed}"
    net = EmojiFeatureNet(2, 3, feature_dim=8, resolution=16, width=8).eval()
    prompts, real = ["red apple", "rocket", "shamrock"], torch.rand(4, 3, 16, 16)
    runs = C.run_comparison(tiny_sd_dir, prompts, real, net, loras, guidance_scale=2.0, teacher_lcm=True)
    rows = [(r.label, r.steps, r.unet_evals) for r in runs[6:]]
    baseline = [(C.TEACHER_LCM, k, k) for k in (1, 2, 4)] + [(f"{C.TEACHER_LCM}, TCD γ=0", k, k) for k in (2, 4)]
    assert rows[:5] == baseline  # guidance 1: one UNet pass a step, no CFG
    assert rows[5:] == [(f"LCM-LoRA [seed{s}]", k, k) for s in (0, 1) for k in (1, 2, 4)]
    assert all(r.metrics["kid_emoji"] == r.metrics["kid_emoji"] for r in runs)  # scored
    # the bare teacher with the LCM sampler is not the LoRA student
    assert not torch.equal(runs[6].latents, runs[11].latents) and not torch.equal(runs[11].latents, runs[14].latents)
    summary = C.format_summary(runs).splitlines()
    assert len(summary) == 2 + 3 and summary[2].startswith("| LCM-LoRA | 1 | 2 | ")
    assert "FID-emoji mean (min-max)" in summary[0]
    table = C.format_table(runs, "DDIM-50")
    assert "| LCM-LoRA [seed1] | 4 | 4 |" in table and f"| {C.TEACHER_LCM}, TCD γ=0 | 2 | 2 |" in table


def _scored(name: str, steps: int, run: str, mse: float, fid: float) -> C.MethodResult:
    r = C.MethodResult(name, steps, steps, torch.zeros(1), torch.zeros(1), 1.0, run)
    r.metrics.update(latent_mse=mse, fid_emoji=fid)
    return r


def test_summary_mean_and_spread_with_known_numbers():
    results = [
        _scored("teacher DDIM", 50, "", 0.0, 10.0),  # a single run: not summarised
        _scored("LCM-LoRA", 1, "s0", 0.5, 20.0),
        _scored("LCM-LoRA", 1, "s1", 0.7, 26.0),
        _scored("LCM-LoRA", 1, "s2", 0.3, 20.0),
        _scored("LCM-LoRA", 4, "s0", 0.2, 12.0),
        _scored("LCM-LoRA", 4, "s1", 0.4, 14.0),
    ]
    rows = C.summarize_runs(results, ("latent_mse", "fid_emoji"))
    assert [(name, steps, n) for name, steps, n, _ in rows] == [("LCM-LoRA", 1, 3), ("LCM-LoRA", 4, 2)]
    (mse_mean, mse_lo, mse_hi), (fid_mean, fid_lo, fid_hi) = rows[0][3]["latent_mse"], rows[0][3]["fid_emoji"]
    assert (mse_mean, mse_lo, mse_hi) == (pytest.approx(0.5), 0.3, 0.7) and (fid_mean, fid_lo, fid_hi) == (22, 20, 26)
    assert rows[1][3]["latent_mse"] == (pytest.approx(0.3), 0.2, 0.4)
    table = C.format_summary(results).splitlines()
    assert table[0] == "| method | steps | runs | latent MSE mean (min-max) | FID-emoji mean (min-max) |"
    assert table[2] == "| LCM-LoRA | 1 | 3 | 0.5000 (0.3000-0.7000) | 22.00 (20.00-26.00) |"
    assert table[3] == "| LCM-LoRA | 4 | 2 | 0.3000 (0.2000-0.4000) | 13.00 (12.00-14.00) |"
    assert C.format_summary(results[:2]) == ""  # no configuration with 2 or more runs


def test_score_names_metrics_after_the_feature_network(runs):
    _, ref, _, _, lcm = runs

    class MeanColour(torch.nn.Module):  # no metric_name: "features"
        num_features = 3

        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    ref, lcm = (dataclasses.replace(r, metrics={}) for r in (ref, lcm))  # unscored copies
    C.score([ref, lcm], ref, torch.rand(6, 3, 16, 16), MeanColour())
    assert {"fid_features", "kid_features", "kid_features_std"} <= set(lcm.metrics)
    assert "| FID-features | KID-features |" in C.format_table([ref, lcm], "DDIM-10")


def test_bench_quality_labels_several_student_folders():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    folders = quality.labelled_folders
    assert folders(None, ["models/lora"], "--lora_dir") == {"lora": "models/lora"}  # the default
    assert folders(None, ["a=x", "b=y"], "--lora_dir") == {"a": "x", "b": "y"}
    assert folders(["none"], ["models/lora"], "--lora_dir") == {}
    assert folders(["runs/s0", "b=runs/x/lora"], ["d"], "--lora_dir") == {"s0": "runs/s0", "b": "runs/x/lora"}
    with pytest.raises(ValueError, match="--lora_dir: two folders are labelled 'lora'"):
        folders(["runs/s0/lora", "runs/s1/lora"], ["d"], "--lora_dir")


def test_a_students_extra_gamma_rows_skip_its_contract_gamma():
    from types import SimpleNamespace

    pipe = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(gamma=0.0)))
    assert C._other_gammas((0.0, 0.3), pipe) == (0.3,)  # a gamma-0 (PCM) student gets no duplicate gamma-0 rows
    assert C._contract_label("LCM (full)", pipe) == "LCM (full), TCD γ=0 (its contract)"
    pipe.scheduler.config.gamma = None
    assert C._other_gammas((0.0,), pipe) == (0.0,) and C._contract_label("LCM-LoRA", pipe) == "LCM-LoRA"


def test_full_students_sample_at_their_own_guidance(tiny_sd_dir):
    """``lcm_guidance_scale`` (bench/quality.py --student_guidance_scale): a plain-UNet full student, such as a ct
    student, runs without CFG at 1 (one UNet pass a step) while the teacher rows keep the CFG scale (two passes)."""
    net = EmojiFeatureNet(2, 3, feature_dim=8, resolution=16, width=8).eval()
    prompts, real = ["red apple", "rocket"], torch.rand(4, 3, 16, 16)
    for scale, per_step in ((1.0, 1), (None, 2)):  # None: the teacher's guidance_scale 2.0, i.e. CFG
        runs = C.run_comparison(tiny_sd_dir, prompts, real, net, None, {"ct": tiny_sd_dir}, guidance_scale=2.0,
                                lcm_guidance_scale=scale)  # fmt: skip
        assert [(r.steps, r.unet_evals) for r in runs[:2]] == [(50, 100), (1, 2)]  # teacher DDIM-50, DDIM-1 + CFG
        assert [(r.steps, r.unet_evals) for r in runs[-3:]] == [(k, per_step * k) for k in (1, 2, 4)]
