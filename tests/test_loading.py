"""lcm_kit.loading: weights that do not all load, and unsupported (SDXL) folders, fail at load time with ValueError.

Damaged folders are copies of the tiny SD folder with one component's safetensors file rewritten; the SDXL folder is
a tiny StableDiffusionXLPipeline saved with ``save_pretrained`` (a folder stock diffusers loads).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lcm_kit import LCMPipeline
from lcm_kit.distill.networks import load_teacher
from lcm_kit.testing import tiny_unet_config

WEIGHT_FILES = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors"}
DAMAGE = {  # how a state dict is damaged, and a weight name the error must show
    "removed": (lambda sd, k: {n: t for n, t in sd.items() if n != k}, lambda k: k),
    "renamed": (lambda sd, k: {(f"old.{n}" if n == k else n): t for n, t in sd.items()}, lambda k: f"old.{k}"),
    # every name under a prefix the class does not know: 0 of N tensors load, as a transformers>=5.6 text encoder
    # (names without `text_model.`) under transformers 4.x
    "prefixed": (lambda sd, k: {f"old.{n}": t for n, t in sd.items()}, lambda k: "unexpected (old."),
}


def damaged_copy(src, dst, component: str, damage: str):
    """A copy of the SD folder ``src`` whose ``component`` weights are damaged; returns ``(folder, shown name)``."""
    shutil.copytree(src, dst)
    path = dst / component / WEIGHT_FILES[component]
    sd = load_file(path)
    key = sorted(sd)[-1]
    rewrite, shown = DAMAGE[damage]
    save_file(rewrite(sd, key), path, metadata={"format": "pt"})
    return dst, shown(key)


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
@pytest.mark.parametrize("damage", ["removed", "renamed", "prefixed"])
def test_incomplete_weights_fail_in_pipeline_and_teacher(tmp_path, tiny_sd_dir, component, damage):
    folder, shown = damaged_copy(tiny_sd_dir, tmp_path / "sd", component, damage)
    for load in (lambda: LCMPipeline.from_pretrained(folder), lambda: load_teacher(str(folder), "cpu", torch.float32)):
        with pytest.raises(ValueError, match=re.escape(str(folder / component))) as err:
            load()
        assert shown in str(err.value) and "random init" in str(err.value)
    if damage == "prefixed":
        assert "The file's weight names carry an extra 'old.' prefix" in str(err.value)


def test_text_encoder_error_names_the_transformers_versions(tmp_path, tiny_sd_dir):
    import transformers
    from packaging.version import Version

    folder, _ = damaged_copy(tiny_sd_dir, tmp_path / "sd", "text_encoder", "prefixed")
    with pytest.raises(ValueError) as err:
        LCMPipeline.from_pretrained(folder)
    written = json.loads((folder / "text_encoder" / "config.json").read_text())["transformers_version"]
    message = str(err.value)
    assert f"Installed: transformers {transformers.__version__}" in message
    assert f"written by transformers {written}" in message
    # below 5.6 the fix is to upgrade (seen with 4.57.6 on the committed models); from 5.6 on, to re-save
    old = Version(transformers.__version__) < Version("5.6")
    assert ("lcm_kit needs transformers>=5.6" if old else "Re-save the component with save_pretrained") in message


def test_complete_folder_loads_with_the_requested_dtypes(tiny_sd_dir):
    pipe = LCMPipeline.from_pretrained(tiny_sd_dir, torch_dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert (pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (torch.bfloat16, torch.float16, torch.float16)
    reference = LCMPipeline.from_pretrained(tiny_sd_dir, low_cpu_mem_usage=False)  # float32, the other load path
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k].to(ours[k].dtype)) for k in ref)


def test_sdxl_folder_is_refused_by_pipeline_and_teacher(tiny_sdxl_dir):
    folder = tiny_sdxl_dir
    with pytest.raises(ValueError, match=r"text_encoder_2.*text_time.*SD 1\.x/2\.x.*LCMXLPipeline"):
        LCMPipeline.from_pretrained(folder)
    assert load_teacher(str(folder), "cpu", torch.float32).xl  # the distiller takes SDXL teachers


def test_text_time_unet_is_refused_before_any_weights_are_read(tmp_path, tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, folder)
    shutil.rmtree(folder / "unet")
    config = {**tiny_unet_config(), "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 16}  # fmt: skip
    UNet2DConditionModel(**config).save_pretrained(folder / "unet")
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()  # a check that needs weights would fail with OSError instead
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time'.*LCMXLPipeline SDXL folders"):
        LCMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"SDXL UNet .*lists no text_encoder_2 / tokenizer_2"):
        load_teacher(str(folder), "cpu", torch.float32)


def test_native_resolution_is_the_vae_decoding_of_the_unet_sample(tiny_sd_dir, tmp_path):
    # Reference: decode a latent of the UNet's sample_size with the folder's own VAE and read the image size.
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lcm_kit.loading import native_resolution

    size = UNet2DConditionModel.load_config(tiny_sd_dir, subfolder="unet")["sample_size"]
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae")
    with torch.no_grad():
        image = vae.decode(torch.zeros(1, vae.config.latent_channels, size, size)).sample
    assert native_resolution(tiny_sd_dir) == image.shape[-1]
    with pytest.raises(ValueError, match="resolution is unknown"):
        native_resolution(tmp_path)


@pytest.mark.parametrize("component, file", [("text_encoder_2", "model.safetensors"),
                                             ("unet", "diffusion_pytorch_model.safetensors")])  # fmt: skip
def test_sdxl_pipeline_fails_on_incomplete_weights(tmp_path, tiny_sdxl_dir, component, file):
    from lcm_kit import LCMXLPipeline

    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, folder)
    sd = load_file(folder / component / file)
    key = sorted(sd)[-1]
    save_file({n: t for n, t in sd.items() if n != key}, folder / component / file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(str(folder / component))) as err:
        LCMXLPipeline.from_pretrained(folder)
    assert key in str(err.value)
    assert isinstance(LCMXLPipeline.from_pretrained(tiny_sdxl_dir), LCMXLPipeline)  # the complete folder loads
