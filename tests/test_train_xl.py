"""SDXL distillation on a tiny SDXL teacher: the text side equals diffusers' SDXL pipeline, the LoRA file uses the
SGM names that kohya / A1111 / ComfyUI use for SDXL and loads completely in stock diffusers, full-mode folders load in
LCMXLPipeline and stock diffusers, per-teacher defaults, exact resume, and a 2-process ``accelerate launch``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_image_folder
from test_train import _one_thread_fresh_accelerate, base_args, load_script, two_process_digests  # noqa: F401

PROMPTS = ["a red circle", "a blue square on a long caption that is cut"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("train_xl_imgs") / "imgs", n=6, corrupt=1)


def test_text_conditioning_equals_the_sdxl_pipeline(tiny_sdxl_dir):
    # reference: diffusers' StableDiffusionXLPipeline.encode_prompt (CFG on, no negative prompt: zeros for uncond)
    from diffusers import StableDiffusionXLPipeline

    from lcm_kit.distill.networks import load_teacher

    half = load_teacher(str(tiny_sdxl_dir), torch.device("cpu"), torch.float16)  # mixed precision fp16
    assert half.vae.dtype == torch.float32  # SDXL's VAE asks for fp32 (force_upcast): it always encodes in fp32
    assert {e.dtype for e in half.text.text_encoders} == {torch.float16}
    teacher = load_teacher(str(tiny_sdxl_dir), torch.device("cpu"), torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    ours = teacher.text(PROMPTS)
    assert teacher.xl and teacher.text.force_zeros_for_empty_prompt
    torch.testing.assert_close(ours["prompt_embeds"], cond, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    null = teacher.text.uncond()
    assert torch.equal(null.embeds, uncond[:1]) and torch.equal(null.pooled, uncond_pooled[:1])
    # the UNet call: the same size / crop ids as the pipeline's _get_add_time_ids, for a 24x16 image center-cropped to
    # 16 px (original (16, 24), crop corner (0, 4), target (16, 16))
    from lcm_kit.transforms import crop_box, size_ids

    dim = pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids((16, 24), (0, 4), (16, 16), torch.float32, dim)
    assert torch.equal(size_ids((24, 16), crop_box((24, 16), 16, center_crop=True), 16, flip=False)[None], ids)


def test_per_teacher_defaults(tiny_sd_dir, tiny_sdxl_dir, images, tmp_path):
    from lcm_kit.distill import parse_config

    def parsed(teacher, *extra):
        c = parse_config(["--pretrained_teacher_model", str(teacher), "--train_data_dir", str(images),
                          "--output_dir", str(tmp_path), *extra])  # fmt: skip
        return c.data.resolution, c.objective.w_min

    assert parsed(tiny_sd_dir) == (512, 5.0)  # diffusers' SD LCM(-LoRA) scripts
    assert parsed(tiny_sdxl_dir) == (1024, 3.0)  # diffusers' SDXL LCM(-LoRA) scripts
    assert parsed(tiny_sdxl_dir, "--resolution", "16", "--w_min", "4") == (16, 4.0)


def test_sdxl_dry_run_says_what_it_found(tmp_path, tiny_sdxl_dir, images, capsys):
    assert load_script().main(base_args(tiny_sdxl_dir, images, tmp_path / "out", 2, "--dry_run")) == 0
    plan = capsys.readouterr().out
    assert "(SDXL, 16 px, w_min 3.0)" in plan and "nothing trained" in plan


def _lora_unet(path, rank=4, seed=0):
    """The teacher UNet of ``path`` with an LCM-LoRA whose B matrices are random (an adapter that does something)."""
    from diffusers import UNet2DConditionModel

    from lcm_kit.lora import add_lcm_lora

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    add_lcm_lora(unet, rank=rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet


def _stock_sdxl_images(folder, lora_dir=None, steps=2, **kwargs):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, **kwargs)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return pipe, torch.from_numpy(out.images)


def test_sdxl_lora_file_uses_sgm_names_and_loads_completely_in_stock_diffusers(tmp_path, tiny_sdxl_dir):
    from peft import get_peft_model_state_dict

    from lcm_kit.lora import adapter_state_dict, save_lora, to_peft

    unet = _lora_unet(tiny_sdxl_dir)
    path = save_lora(unet, tmp_path)[0]
    file = load_file(path)
    modules = {k.partition(".")[0] for k in file}
    assert modules and all(m.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                                         "lora_unet_output_blocks")) for m in modules)  # fmt: skip
    # SDXL's block layout in SGM names: the upsampler of the first up block sits after its attention (.2.conv)
    assert "lora_unet_output_blocks_2_2_conv" in modules and "lora_unet_input_blocks_3_0_op" in modules
    ours = adapter_state_dict(unet, "default")
    assert to_peft(file, ours, unet.config).keys() == ours.keys()
    pipe, images = _stock_sdxl_images(tiny_sdxl_dir, tmp_path)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert len(loaded) == len(ours)  # every tensor of the file became a LoRA weight of the stock UNet
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())
    # compared by images: stock diffusers with the file == stock diffusers with our adapted UNet itself
    _, direct = _stock_sdxl_images(tiny_sdxl_dir, unet=unet.eval())
    torch.testing.assert_close(images, direct, rtol=0, atol=1e-5)
    _, plain = _stock_sdxl_images(tiny_sdxl_dir)
    assert (images - plain).abs().max() > 1e-3  # the LoRA changes the images


def test_sdxl_lora_distillation_resumes_exactly_and_loads_in_lcmxl(tmp_path, tiny_sdxl_dir, images):
    from lcm_kit import LCMXLPipeline

    main = load_script().main
    extra = ("--gradient_accumulation_steps", "2", "--random_flip", "--validation_steps", "2")
    assert main(base_args(tiny_sdxl_dir, images, tmp_path / "a", 4, *extra)) == 0
    main(base_args(tiny_sdxl_dir, images, tmp_path / "b", 3, *extra))
    main(base_args(tiny_sdxl_dir, images, tmp_path / "b", 4, *extra, "--resume_from_checkpoint", "latest"))
    a, b = (load_file(tmp_path / r / "pytorch_lora_weights.safetensors") for r in "ab")
    mid = load_file(tmp_path / "b" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - mid[k]).abs().max().item() for k in a) > 1e-5  # the resumed run did train
    config = json.loads((tmp_path / "a" / "training_config.json").read_text())
    assert config["w_min"] == 3.0 and config["resolution"] == 16
    assert (tmp_path / "a" / "validation" / "step-4.png").is_file()  # validation ran through LCMXLPipeline
    card = (tmp_path / "a" / "README.md").read_text()
    assert "LCMXLPipeline.from_pretrained" in card and "StableDiffusionXLPipeline.from_pretrained" in card
    pipe = LCMXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(tmp_path / "a")
    assert pipe.scheduler.config.sampling_contract["objective"] == "lcm"


def test_sdxl_full_mode_folder_loads_in_lcmxl_and_stock_diffusers(tmp_path, tiny_sdxl_dir, images):
    from lcm_kit import LCMXLPipeline

    out = tmp_path / "full"
    assert load_script().main(base_args(tiny_sdxl_dir, images, out, 2, "--mode", "full",
                                        "--time_cond_proj_dim", "32")) == 0  # fmt: skip
    pipe = LCMXLPipeline.from_pretrained(out)
    assert pipe.has_w_embedding
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(PROMPTS, num_inference_steps=2, guidance_scale=8.5, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    from diffusers import StableDiffusionXLPipeline

    stock = StableDiffusionXLPipeline.from_pretrained(out)
    stock.set_progress_bar_config(disable=True)
    theirs = stock(PROMPTS, num_inference_steps=2, guidance_scale=8.5, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("objective, mode", [("ct", "lora"), ("pcm", "full")])
def test_sdxl_other_objectives_run_from_the_cache(tmp_path, tiny_sdxl_dir, images, objective, mode):
    out = tmp_path / "out"
    extra = ("--objective", objective, "--mode", mode, "--time_cond_proj_dim", "32", "--num_phases", "2",
             "--cache_dir", str(tmp_path / "cache"), "--center_crop", "--random_flip")  # fmt: skip
    assert load_script().main(base_args(tiny_sdxl_dir, images, out, 2, *extra)) == 0
    assert any((tmp_path / "cache").glob("lcm_cache-*/shard-*.safetensors"))


@pytest.mark.slow
def test_sdxl_two_process_launch_writes_a_lora_stock_diffusers_loads(tmp_path, tiny_sdxl_dir, images):
    from peft import get_peft_model_state_dict

    from lcm_kit.distill.outputs import state_digest
    from lcm_kit.lora import adapter_state_dict, to_peft

    out = tmp_path / "out"
    d0, d1 = two_process_digests(out, base_args(tiny_sdxl_dir, images, out, 2))
    file = load_file(out / "pytorch_lora_weights.safetensors")
    assert d0 == d1 == state_digest(file)  # both ranks hold the saved weights
    pipe, images_file = _stock_sdxl_images(tiny_sdxl_dir, out)
    unet = _lora_unet(tiny_sdxl_dir)
    peft = to_peft(file, adapter_state_dict(unet, "default"), unet.config)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert len(loaded) == len(peft) and all(torch.equal(loaded[k], v) for k, v in peft.items())
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(unet, peft)
    _, direct = _stock_sdxl_images(tiny_sdxl_dir, unet=unet.eval())
    torch.testing.assert_close(images_file, direct, rtol=0, atol=1e-5)


def test_sgm_names_of_a_full_size_sdxl_unet_convert_back_in_diffusers():
    # SDXL base's real UNet config (on the meta device: no weights): every LCM-LoRA module's SGM name must come back
    # to that very module through diffusers' own kohya / SGM conversion (the reference)
    import re

    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from lcm_kit.lora import LCM_LORA_TARGET_MODULES, to_kohya

    config = dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2, use_linear_projection=True,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)  # fmt: skip
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    targets = LCM_LORA_TARGET_MODULES
    modules = [n for n, _ in unet.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    peft = {f"{m}.lora_{ab}.weight": torch.zeros(1) for m in modules for ab in "AB"}
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(to_kohya(peft, 1.0, unet.config), unet_config=unet.config)

    def module_key(key: str) -> str:  # diffusers' attention-processor spelling -> the module's own path
        key = re.sub(r"\.processor\.to_(q|k|v)_lora\.", r".to_\1.lora.", key.removeprefix("unet."))
        key = key.replace(".processor.to_out_lora.", ".to_out.0.lora.")
        return key.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")

    assert len(modules) == 788 and {module_key(k) for k in converted} == set(peft)
