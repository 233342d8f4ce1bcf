"""``train/distill_lora.py --objective ct`` end to end on the tiny SD folder: LoRA and from-scratch full runs, the
saved sampling contract, exact resume, and a curriculum change refused on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import _one_thread_fresh_accelerate, base_args, images, load_script  # noqa: F401 (fixtures)


def test_ct_lora_trains_and_carries_its_sampling_contract(tmp_path, tiny_sd_dir, images):  # noqa: F811
    from PIL import Image

    from lcm_kit.contract import read_lora_contract
    from lcm_kit.pipeline import LCMPipeline

    out = tmp_path / "out"
    argv = base_args(tiny_sd_dir, images, out, 2, "--objective", "ct", "--validation_steps", "2",
                     "--validation_prompts", "a red circle", "--save_peft_layout")  # fmt: skip
    assert load_script().main(argv) == 0
    config = json.loads((out / "training_config.json").read_text())
    assert config["objective"] == "ct" and config["ct_total_steps"] == 2  # the curriculum length is recorded
    contract = read_lora_contract(out / "pytorch_lora_weights.safetensors")
    assert (contract.objective, contract.num_inference_steps, contract.w_range) == ("ct", 2, None)
    assert read_lora_contract(out / "pytorch_lora_weights_peft.safetensors") == contract
    card = (out / "README.md").read_text()
    assert "consistency training without a teacher UNet" in card and "caption dropout 0.1" in card
    assert "guidance_scale > 1 adds CFG" in card and "guidance is distilled in" not in card
    assert Image.open(out / "validation" / "step-2.png").size == (3 * 16, 16)

    pipe = LCMPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a red circle", guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.load_lora_weights(out)  # applies the contract: 2 LCM steps; CFG (guidance_scale 2) on the plain UNet
    assert pipe.scheduler.config.sampling_contract["objective"] == "ct"
    image = pipe("a red circle", guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(image.images).all() and not np.allclose(plain.images, image.images, atol=1e-6)


def test_ct_full_from_scratch_is_a_plain_unet_sampled_with_cfg(tmp_path, tiny_sd_dir, images):  # noqa: F811
    from diffusers import UNet2DConditionModel

    from lcm_kit.pipeline import LCMPipeline

    out = tmp_path / "out"
    argv = base_args(tiny_sd_dir, images, out, 2, "--objective", "ct", "--mode", "full", "--init", "random",
                     "--ct_schedule", "ect", "--loss_type", "cauchy", "--ema_decay", "0.5")  # fmt: skip
    assert load_script().main(argv) == 0
    pipe = LCMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim is None  # no w-embedding: CFG comes from caption dropout
    assert pipe.scheduler.config.sampling_contract["objective"] == "ct"
    assert 'guidance_scale=1.0' in (out / "README.md").read_text()  # not the w range of a guided student (11)
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    w_student, w_teacher = pipe.unet.conv_in.weight, teacher.conv_in.weight
    assert (w_student - w_teacher).abs().max() > 0.05  # random init, not the teacher's weights
    online = load_file(out / "unet_online" / "diffusion_pytorch_model.safetensors")
    assert (online["conv_in.weight"] - w_student).abs().max() > 0  # the saved UNet is the EMA copy
    image = pipe("a red circle", guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert image.images.shape == (1, 16, 16, 3) and np.isfinite(image.images).all()


def test_ct_resume_is_exact_and_a_changed_curriculum_is_refused(tmp_path, tiny_sd_dir, images):  # noqa: F811
    # K = 4 steps: K' = 1, so N doubles every step (11, 21, 41, 81): the resumed step must use the global step.
    main = load_script().main
    extra = ("--objective", "ct", "--ct_total_steps", "4", "--gradient_accumulation_steps", "2", "--random_flip")
    main(base_args(tiny_sd_dir, images, tmp_path / "a", 4, *extra))
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 3, *extra))
    changed = base_args(tiny_sd_dir, images, tmp_path / "b", 4, *extra, "--resume_from_checkpoint", "latest")
    changed[changed.index("--ct_total_steps") + 1] = "5"
    with pytest.raises(ValueError, match=r"different training flags \{'ct_total_steps': \[4, 5\]\}"):
        main(changed)
    main(base_args(tiny_sd_dir, images, tmp_path / "b", 4, *extra, "--resume_from_checkpoint", "latest"))
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    mid = load_file(tmp_path / "b" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert max((a[k] - mid[k]).abs().max().item() for k in a) > 1e-5  # the resumed run did train
    # The loop feeds the global step to the curriculum: with K = 400 (N = 11 throughout) step 2 differs from K = 4.
    slow = [*extra[:3], "400", *extra[4:]]
    main(base_args(tiny_sd_dir, images, tmp_path / "c", 2, *slow))
    c = load_file(tmp_path / "c" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    a2 = load_file(tmp_path / "a" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert max((a2[k] - c[k]).abs().max().item() for k in a2) > 1e-6


def test_ct_lora_ema_adapter_is_what_is_sampled_and_saved(tmp_path, tiny_sd_dir, images):  # noqa: F811
    # ct has no target network; with --lora_ema the EMA adapter is kept for sampling only: the saved LoRA is the EMA
    # copy (decay 0.5: visibly behind the trained adapter after 2 steps), with the contract in its metadata.
    from lcm_kit.contract import read_lora_contract
    from lcm_kit.distill.checkpoints import EMA_WEIGHT_NAME
    from lcm_kit.lora import to_peft

    out = tmp_path / "out"
    argv = base_args(tiny_sd_dir, images, out, 2, "--objective", "ct", "--lora_ema", "--ema_decay", "0.5",
                     "--validation_steps", "2", "--validation_prompts", "a red circle")  # fmt: skip
    assert load_script().main(argv) == 0
    ema = load_file(out / "checkpoint-2" / EMA_WEIGHT_NAME)  # peft keys
    saved = to_peft(load_file(out / "pytorch_lora_weights.safetensors"), ema)
    online = to_peft(load_file(out / "checkpoint-2" / "pytorch_lora_weights.safetensors"), ema)
    assert saved.keys() == online.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in saved)
    assert max((saved[k] - online[k]).abs().max().item() for k in saved) > 1e-6
    assert read_lora_contract(out / "pytorch_lora_weights.safetensors").objective == "ct"
    assert (out / "validation" / "step-2.png").is_file()


@pytest.mark.slow
def test_ct_two_processes_agree(tmp_path, tiny_sd_dir, images):  # noqa: F811
    # Two gloo ranks (see test_train.test_accelerate_two_processes_agree): each draws its own pairs, both follow the
    # same global-step curriculum, and the student is called twice per micro-batch through DDP (with and without
    # gradients); the ranks must end with identical weights.
    from test_train import two_process_digests

    from lcm_kit.distill.outputs import state_digest

    out = tmp_path / "out"
    d0, d1 = two_process_digests(out, base_args(tiny_sd_dir, images, out, 2, "--objective", "ct"))
    assert d0 == d1 == state_digest(load_file(out / "pytorch_lora_weights.safetensors"))
