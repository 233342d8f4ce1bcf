"""train/distill_lora.py end to end on tiny SD folders: both modes, stock-diffusers loading, exact resume, NaN stop,
bad-input errors before training, the latent cache, dry run, and a 2-process ``accelerate launch``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_data import make_image_folder, make_shards

from lcm_kit.distill import parse_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "distill_lora.py"


@pytest.fixture(autouse=True)
def _one_thread_fresh_accelerate():
    # One thread: on a shared 2-core machine two OpenMP threads per process are up to 40x slower for tiny convs.
    # accelerate keeps a process-wide singleton state (mixed precision, ...): reset it between in-process runs.
    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(1)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def load_script():
    if "distill_lora" not in sys.modules:
        spec = importlib.util.spec_from_file_location("distill_lora", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["distill_lora"] = module
        spec.loader.exec_module(module)
    return sys.modules["distill_lora"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("train_imgs") / "imgs", n=6, corrupt=1)


def base_args(teacher, images, out, steps=2, *extra) -> list[str]:
    return [
        "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(images), "--output_dir", str(out),
        "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", str(steps), "--lora_rank", "4",
        "--checkpointing_steps", "2", "--validation_steps", "0", "--report_to", "none", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--seed", "1", *extra,
    ]  # fmt: skip


def test_lora_run_loads_in_stock_diffusers(tmp_path, tiny_sd_dir, images):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    from lcm_kit.lora import LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, to_peft

    out = tmp_path / "out"
    argv = base_args(tiny_sd_dir, images, out, 2, "--save_peft_layout", "--validation_steps", "2", "--report_to",
                     "tensorboard", "--validation_prompts", "a red circle|a blue square", "--random_flip")  # fmt: skip
    assert load_script().main(argv) == 0
    config = json.loads((out / "training_config.json").read_text())
    assert config["mode"] == "lora" and config["lora_rank"] == 4 and config["w_min"] == 5.0
    assert (out / "checkpoint-2" / LORA_WEIGHT_NAME).is_file()
    peft = load_file(out / PEFT_WEIGHT_NAME)
    assert all(k.startswith("unet.") and ".lora_" in k for k in peft)
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "kohya-ss layout" in card and PEFT_WEIGHT_NAME in card
    from PIL import Image

    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.size == (3 * 16, 2 * 16)  # columns 1/2/4 steps, rows prompts
    assert list((out / "logs").rglob("events.out.tfevents*"))

    state = load_file(out / LORA_WEIGHT_NAME)  # the default file: kohya layout, the PEFT file's tensors renamed
    assert all(k.startswith("lora_unet_") for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_up" in k)  # trained (B starts at zero)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # fmt: skip

    before = sample()
    pipe.load_lora_weights(out)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert loaded.keys() == {k.removeprefix("unet.") for k in peft}  # every tensor of the file landed in the UNet
    assert all(torch.equal(v, peft[f"unet.{k}"]) for k, v in loaded.items())
    assert all(torch.equal(v, loaded[k]) for k, v in to_peft(state, loaded).items())
    assert not np.allclose(before, sample(), atol=1e-6)


def test_full_run_loads_with_lcm_pipeline(tmp_path, tiny_sd_dir, images):
    from lcm_kit.pipeline import LCMPipeline

    out = tmp_path / "out"
    assert load_script().main(base_args(tiny_sd_dir, images, out, 2, "--mode", "full", "--ema_decay", "0.5")) == 0
    pipe = LCMPipeline.from_pretrained(out)
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert pipe.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # EMA target moved off the zero init
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert image.images.shape == (1, 16, 16, 3) and np.isfinite(image.images).all()
    assert (out / "checkpoint-2" / "unet_target" / "diffusion_pytorch_model.safetensors").is_file()
    assert "LCMPipeline.from_pretrained" in (out / "README.md").read_text()


def test_w_student_starts_equal_to_teacher(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from lcm_kit.conditioning import TextCond
    from lcm_kit.distill.networks import call_unet, w_student_from

    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    student = w_student_from(teacher, 256)
    z, t, e = torch.randn(2, 4, 8, 8), torch.tensor([999, 259]), TextCond(torch.randn(2, 77, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            call_unet(student, z, t, e, torch.tensor([3.0, 14.0]), 256), call_unet(teacher, z, t, e), rtol=0, atol=0
        )


def test_resume_is_exact(tmp_path, tiny_sd_dir, images):
    # 6 samples, batch 2, accumulation 2: 3 micro-batches per epoch, so the resume point is mid-epoch and the run
    # crosses epochs; random flips on.
    main = load_script().main
    extra = ("--gradient_accumulation_steps", "2", "--random_flip")
    main(base_args(tiny_sd_dir, images, tmp_path / "a", 4, *extra))
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 3, *extra))
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 4, *extra, "--resume_from_checkpoint", "latest"))
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    mid = load_file(tmp_path / "b" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - mid[k]).abs().max().item() for k in a) > 1e-5  # the resumed run did train
    # a checkpoint written before the default file became the kohya layout (PEFT keys, the old flag in its config,
    # no sha256 manifest: that came later too) resumes just as exactly
    from diffusers import UNet2DConditionModel

    from lcm_kit.digests import MANIFEST_NAME
    from lcm_kit.lora import LORA_WEIGHT_NAME, adapter_state_dict, add_lcm_lora, to_peft

    old = tmp_path / "c" / "checkpoint-2"
    shutil.copytree(tmp_path / "b" / "checkpoint-2", old)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    add_lcm_lora(unet, rank=4)
    peft = to_peft(mid, adapter_state_dict(unet, "default"))
    save_file({f"unet.{k}": v for k, v in peft.items()}, old / LORA_WEIGHT_NAME)
    config = json.loads((old / "training_config.json").read_text())
    config["save_kohya"] = config.pop("save_peft_layout")
    (old / "training_config.json").write_text(json.dumps(config))
    (old / MANIFEST_NAME).unlink()
    main(base_args(tiny_sd_dir, images, tmp_path / "c", 4, *extra, "--resume_from_checkpoint", "latest"))
    c = load_file(tmp_path / "c" / LORA_WEIGHT_NAME)
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, tiny_sd_dir, images):
    # Checkpointed recomputation runs after teacher_mode() has re-enabled the adapter: it must see the student.
    main = load_script().main
    main(base_args(tiny_sd_dir, images, tmp_path / "a", 2, "--checkpointing_steps", "0"))
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 2, "--checkpointing_steps", "0", "--gradient_checkpointing"))
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("mode, teacher",
                         [("lora", "tiny_sd_dir"), ("full", "tiny_sd_dir"), ("lora", "tiny_sdxl_dir")])
def test_bf16_mixed_precision_runs(tmp_path, request, images, mode, teacher):
    # Frozen weights in bf16, trainable ones fp32; validation runs with mixed-dtype components under autocast (SDXL:
    # the pooled embeddings and size ids go into the bf16 UNet as well, the VAE stays fp32).
    out = tmp_path / "out"
    extra = ("--mode", mode, "--mixed_precision", "bf16", "--validation_steps", "2")
    argv = base_args(request.getfixturevalue(teacher), images, out, 2, *extra)
    assert load_script().main(argv) == 0
    assert (out / "validation" / "step-2.png").is_file()
    name = "pytorch_lora_weights.safetensors" if mode == "lora" else "unet/diffusion_pytorch_model.safetensors"
    weights = out / name
    state = load_file(weights)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())


def test_checkpoint_limit_and_resume_from_path(tmp_path, tiny_sd_dir, images):
    main, out = load_script().main, tmp_path / "out"
    main(base_args(tiny_sd_dir, images, out, 3, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text()) == {"global_step": 3}
    main(base_args(tiny_sd_dir, images, out, 4, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert (out / "checkpoint-4").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_sd_dir, images):
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at optimizer step 3.*checkpoint-2"):
        load_script().main(base_args(tiny_sd_dir, images, out, 4, "--debug_nan_at_step", "3"))
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "checkpoint-3").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"--pretrained_teacher_model": "/nonexistent/teacher"}, "teacher folder"),
        ({"--caption_column": "caption"}, r"available columns: \['image', 'text'\]"),
        ({"--train_data_dir": "EMPTY"}, "empty"),
        ({"--lora_rank": "0"}, "lora_rank"),
        ({"--w_min": "9", "--w_max": "3"}, "w_min"),
        ({"--output_dir": "UNWRITABLE"}, "not writable"),
        ({"--use_8bit_adam": "true"}, "bitsandbytes"),
        ({"--resume_from_checkpoint": "/nonexistent/checkpoint-5"}, "not a checkpoint folder"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, tiny_sd_dir, images, monkeypatch, change, match):
    import lcm_kit.distill.loop

    monkeypatch.setattr(lcm_kit.distill.loop, "train", lambda *a, **k: pytest.fail("training started"))
    argv = base_args(tiny_sd_dir, images, tmp_path / "out", 2)
    for flag, value in change.items():
        if value == "EMPTY":
            value = str(make_image_folder(tmp_path / "empty", n=0, corrupt=2))
        if value == "UNWRITABLE":
            (tmp_path / "file").write_text("x")
            value = str(tmp_path / "file" / "out")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(ValueError, match=match):
        load_script().main(argv)


def test_dry_run_and_latent_cache(tmp_path, tiny_sd_dir, images, capsys):
    main, out = load_script().main, tmp_path / "out"
    cache = tmp_path / "cache"
    extra = ("--cache_dir", str(cache), "--center_crop", "--random_flip")
    assert main(base_args(tiny_sd_dir, images, out, 2, "--dry_run", *extra)) == 0
    plan = capsys.readouterr().out
    assert "[plan] mode=lora" in plan and "6 samples (1 skipped)" in plan and "nothing trained" in plan
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not list(out.glob("checkpoint-*"))
    (folder,) = cache.glob("lcm_cache-*")
    assert "[data] latent cache" in plan and "6 samples" in plan and "KiB/sample" in plan  # size reported
    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main(base_args(tiny_sd_dir, images, out, 2, *extra)) == 0  # trains from the cache, reused unchanged
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_webdataset_shards_train(tmp_path, tiny_sd_dir, images):
    pattern = make_shards(tmp_path / "shards", caption="json", corrupt=1)
    argv = base_args(tiny_sd_dir, images, tmp_path / "out", 2)
    argv[argv.index("--train_data_dir") : argv.index("--train_data_dir") + 2] = ["--train_shards", pattern]
    assert load_script().main(argv) == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_config_parses_every_flag_into_its_part(tiny_sd_dir, images):
    # HfArgumentParser maps the flat flags onto the five frozen parts; prediction_type is no flag (the teacher's).
    argv = base_args(tiny_sd_dir, images, "out", 2, "--mode", "full", "--mixed_precision", "bf16", "--lora_alpha",
                     "8", "--num_ddim_timesteps", "25", "--center_crop", "--save_peft_layout", "false")  # fmt: skip
    cfg = parse_config(argv)
    assert (cfg.model.mode, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_scale_alpha) == ("full", 4, 8, 8)
    assert (cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip) == (16, True, False)
    assert (cfg.objective.objective, cfg.objective.num_ddim_timesteps, cfg.objective.w_min) == ("lcm", 25, 5.0)
    assert (cfg.optim.mixed_precision, cfg.optim.max_train_steps, cfg.optim.seed) == ("bf16", 2, 1)
    assert (cfg.output.output_dir, cfg.output.checkpoints_total_limit) == ("out", None)
    assert cfg.output.save_peft_layout is False
    with pytest.raises(ValueError, match="--save_kohya is gone: the default pytorch_lora_weights.safetensors is"):
        parse_config(base_args(tiny_sd_dir, images, "out") + ["--save_kohya", "true"])
    assert parse_config(base_args(tiny_sd_dir, images, "out")).model.lora_scale_alpha == 4  # alpha defaults to rank
    assert cfg.resolved()["num_ddim_timesteps"] == 25 and len(cfg.resolved()) == sum(
        len(dataclasses.fields(p)) for p in (cfg.model, cfg.data, cfg.objective, cfg.optim, cfg.output)
    )
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['--prediction_type', 'sample'\]"):
        parse_config(base_args(tiny_sd_dir, images, "out") + ["--prediction_type", "sample"])
    for bad in (["--mode", "both"], ["--objective", "nope"], ["--lora_rank", "x"]):
        with pytest.raises(SystemExit):
            parse_config(base_args(tiny_sd_dir, images, "out") + bad)


def test_student_is_saved_and_validated_with_its_training_grid(tmp_path, tiny_sd_dir, images):
    # A full student trained with non-default timestep_scaling / num_ddim_timesteps / sigma_data must be saved (and
    # validated) with them: the reference is diffusers' LCMScheduler built from those values.
    from diffusers import LCMScheduler

    import lcm_kit.distill.loop as loop
    from lcm_kit.pipeline import LCMPipeline

    seen = []
    real_grid = loop.outputs.validation_grid
    loop.outputs.validation_grid = lambda unet, teacher, scheduler, *a: seen.append(scheduler) or real_grid(
        unet, teacher, scheduler, *a
    )
    try:
        out = tmp_path / "out"
        argv = base_args(tiny_sd_dir, images, out, 2, "--mode", "full", "--timestep_scaling", "5",
                         "--num_ddim_timesteps", "25", "--sigma_data", "0.4", "--validation_steps", "2")  # fmt: skip
        assert load_script().main(argv) == 0
    finally:
        loop.outputs.validation_grid = real_grid
    saved = LCMPipeline.from_pretrained(out).scheduler
    for sched in (saved, seen[0]):
        assert (sched.config.timestep_scaling, sched.config.original_inference_steps) == (5.0, 25)
        assert sched.config.sigma_data == 0.4
    ref = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    ref.set_timesteps(4)
    saved.set_timesteps(4)
    assert ref.config.original_inference_steps == 25 and ref.config.timestep_scaling == 5.0
    assert saved.timesteps.tolist() == ref.timesteps.tolist() == [999, 759, 519, 279]  # k = 1000 // 25 = 40
    card = (out / "README.md").read_text()
    assert "original_inference_steps=25" in card and "timestep_scaling=5.0" in card and "sigma_data=0.4" in card


def two_process_digests(out: Path, argv: list[str]) -> tuple[str, str]:
    """Runs the launcher under ``accelerate launch`` with 2 CPU (gloo) ranks; returns each rank's parameter digest."""
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x unless an MPI hostfile is
    # given; torchrun (`--multi_gpu`) plus ACCELERATE_USE_CPU=true gives DistributedType.MULTI_CPU with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           *argv, "--debug_param_digest"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    assert "x 2 process(es)" in (out / "README.md").read_text()  # really two data-parallel ranks
    d0, d1 = ((out / f"debug_params_rank{r}.txt").read_text() for r in (0, 1))
    return d0, d1


@pytest.mark.slow
def test_accelerate_two_processes_agree(tmp_path, tiny_sd_dir, images):
    from lcm_kit.distill.outputs import state_digest

    out = tmp_path / "out"
    d0, d1 = two_process_digests(out, base_args(tiny_sd_dir, images, out, 2))
    assert d0 == d1  # both ranks hold identical LoRA weights
    assert state_digest(load_file(out / "pytorch_lora_weights.safetensors")) == d0  # and that is what was saved


@pytest.mark.parametrize("objective, mode", [("pcm", "full"), ("tcd", "lora")])
def test_trajectory_objectives_train_and_record_how_to_sample(tmp_path, tiny_sd_dir, images, objective, mode):
    from PIL import Image

    out = tmp_path / "out"
    argv = base_args(tiny_sd_dir, images, out, 2, "--objective", objective, "--num_phases", "2", "--mode", mode,
                     "--validation_steps", "2", "--validation_prompts", "a red circle",
                     "--save_peft_layout")  # fmt: skip
    assert load_script().main(argv) == 0
    card = (out / "README.md").read_text()
    grid = Image.open(out / "validation" / "step-2.png")
    if objective == "pcm":  # deterministic on the two phase edges: one validation column, gamma 0 in the folder
        from lcm_kit.pipeline import LCMPipeline

        assert "timesteps=[999, 499]" in card and "gamma 0.0" in card and grid.size == (16, 16)
        config = LCMPipeline.from_pretrained(out).scheduler.config
        assert config.gamma == 0.0 and config.sampling_contract["timesteps"] == [999, 499]
        assert config.sampling_contract["objective"] == "pcm" and config.sampling_contract["w_range"] == [5.0, 15.0]
    else:
        from lcm_kit.contract import read_lora_contract

        assert "num_inference_steps=4" in card and "gamma 0.3" in card and grid.size == (3 * 16, 16)
        contract = read_lora_contract(out / "pytorch_lora_weights.safetensors")
        assert contract.objective == "tcd" and contract.scheduler["gamma"] == 0.3 and contract.timesteps is None
        assert read_lora_contract(out / "pytorch_lora_weights_peft.safetensors") == contract


def test_lora_ema_target_resumes_exactly_and_lags_the_student(tmp_path, tiny_sd_dir, images):
    # --lora_ema: the target is a second adapter that follows the trained one as an EMA (decay 0.5 here, so it
    # moves visibly in 4 steps); it is checkpointed, so resuming mid-run gives the same weights bit for bit.
    from lcm_kit.distill.checkpoints import EMA_WEIGHT_NAME
    from lcm_kit.lora import to_peft

    main = load_script().main
    extra = ("--lora_ema", "--ema_decay", "0.5")
    main(base_args(tiny_sd_dir, images, tmp_path / "a", 4, *extra))
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 3, *extra))
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 4, *extra, "--resume_from_checkpoint", "latest"))
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    ema2, ema4 = (load_file(tmp_path / "a" / f"checkpoint-{s}" / EMA_WEIGHT_NAME) for s in (2, 4))
    online4 = to_peft(a, ema4)
    assert ema4.keys() == online4.keys()
    b_keys = [k for k in online4 if "lora_B" in k]  # B starts at 0 in both adapters; the EMA trails the student
    assert max((ema4[k] - ema2[k]).abs().max().item() for k in b_keys) > 0
    assert max((ema4[k] - online4[k]).abs().max().item() for k in b_keys) > 1e-6
    b_ema4 = load_file(tmp_path / "b" / "checkpoint-4" / EMA_WEIGHT_NAME)
    assert all(torch.equal(ema4[k], b_ema4[k]) for k in ema4)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"--checkpointing_steps": "-1"}, "checkpointing_steps must be >= 0"),
        ({"--validation_steps": "-1"}, "validation_steps must be >= 0"),
        ({"--validation_steps": "2", "--validation_prompts": " | "}, "holds no prompt"),
        ({"--validation_steps": "2", "--validation_prompts": ""}, "holds no prompt"),
    ],
)
def test_bad_step_counts_and_empty_prompts_fail_before_loading(tmp_path, tiny_sd_dir, images, change, match):
    argv = base_args(tiny_sd_dir, images, tmp_path / "out", 2)
    for flag, value in change.items():
        argv += [flag, value]  # the last occurrence of a flag wins
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_resume_refuses_changed_flags_unless_allowed(tmp_path, tiny_sd_dir, images, caplog):
    main, out = load_script().main, tmp_path / "out"
    with caplog.at_level("WARNING"):
        main(base_args(tiny_sd_dir, images, out, 2, "--resume_from_checkpoint", "latest"))
    assert "no checkpoint in" in caplog.text and "starting from scratch" in caplog.text
    (out / "checkpoint-1").mkdir()  # an incomplete checkpoint folder is never "latest"
    changed = base_args(tiny_sd_dir, images, out, 3, "--resume_from_checkpoint", "latest")
    changed[changed.index("--learning_rate") + 1] = "5e-4"
    with pytest.raises(ValueError, match=r"different training flags \{'learning_rate': \[0.001, 0.0005\]\}"):
        main(changed)
    assert main([*changed, "--allow_config_change"]) == 0
    (entry,) = [json.loads(x) for x in (out / "training_config_history.jsonl").read_text().splitlines()]
    assert entry["changed"] == {"learning_rate": [0.001, 0.0005]} and entry["resumed_from"].endswith("checkpoint-2")
    assert "3 optimizer steps" in (out / "README.md").read_text()


def test_resume_with_dropout_needs_the_rng_states(tmp_path, tiny_sd_dir, images):
    main, out = load_script().main, tmp_path / "out"
    main(base_args(tiny_sd_dir, images, out, 2, "--lora_dropout", "0.1"))
    resume = base_args(tiny_sd_dir, images, out, 3, "--lora_dropout", "0.1", "--resume_from_checkpoint", "latest")
    states = out / "checkpoint-2" / "random_states_0.pkl"
    # corrupt but not empty: accelerate would log "Could not load random states" at INFO and go on, not exact
    good = states.read_bytes()
    states.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    with pytest.raises(ValueError, match=r"random_states_0.pkl is corrupt"):
        main(resume)
    states.unlink()
    with pytest.raises(ValueError, match=r"random_states_0.pkl is missing or empty"):
        main(resume)
    states.write_bytes(good)  # restored: the resume goes ahead
    assert main(resume) == 0


def test_a_failing_validation_neither_stops_training_nor_loses_weights(tmp_path, tiny_sd_dir, images, monkeypatch):
    import lcm_kit.distill.outputs as outputs

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(outputs, "validation_grid", broken)
    out = tmp_path / "out"
    assert load_script().main(base_args(tiny_sd_dir, images, out, 2, "--validation_steps", "1")) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
