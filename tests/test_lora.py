"""Tests of lcm_kit.lora on tiny SD UNets: trainable params, teacher_mode, the default file (kohya-ss layout) and the
PEFT-layout file in stock diffusers, key conversions, CLI."""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcm_kit.contract import SamplingContract
from lcm_kit.lora import (
    LCM_LORA_TARGET_MODULES,
    LORA_WEIGHT_NAME,
    PEFT_WEIGHT_NAME,
    adapter_state_dict,
    add_lcm_lora,
    lora_state_dict,
    main,
    make_lora_config,
    save_lora,
    teacher_mode,
    to_kohya,
    to_peft,
)
from lcm_kit.testing import tiny_unet_config


def _unet(dtype=torch.float32) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).to(dtype).eval()


def _randomise_lora_b(unet, seed: int = 1, std: float = 0.05) -> None:
    """peft initialises lora_B to zero (a no-op adapter); tests need adapters that change outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    context = torch.randn(2, 5, 16, generator=gen).to(dtype)
    return sample, torch.tensor([999, 259]), context


def _lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_lcm_lora_trains_only_fp32_lora_params(dtype):
    unet = _unet(dtype)
    count = add_lcm_lora(unet, rank=4)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and set(trainable) == set(_lora_names(unet))
    assert count == sum(p.numel() for p in trainable.values())
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == dtype for n, p in unet.named_parameters() if "lora_" not in n)
    if dtype != torch.float16:  # fp16 convolutions are not implemented on every CPU build
        _randomise_lora_b(unet)
        sample, t, context = _inputs(dtype)
        unet(sample, t, context).sample.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_every_target_module_name_matches_the_sd_unet():
    unet = _unet()
    add_lcm_lora(unet, rank=2)
    adapted = {n.rsplit(".lora_", 1)[0] for n in _lora_names(unet)}
    for target in LCM_LORA_TARGET_MODULES:
        assert any(m == target or m.endswith("." + target) for m in adapted), target


def test_teacher_mode_is_the_base_unet_and_always_restores_adapters():
    unet = _unet()
    base = copy.deepcopy(unet)
    add_lcm_lora(unet, rank=4)
    _randomise_lora_b(unet)
    sample, t, context = _inputs()
    with torch.no_grad():
        expected, student = base(sample, t, context).sample, unet(sample, t, context).sample
        assert (student - expected).abs().max() > 1e-3
        with teacher_mode(unet) as teacher:
            assert teacher is unet
            torch.testing.assert_close(unet(sample, t, context).sample, expected, rtol=0, atol=0)
            assert not any(p.requires_grad for p in unet.parameters())  # peft freezes disabled adapters
        torch.testing.assert_close(unet(sample, t, context).sample, student, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="boom"), teacher_mode(unet):
            raise RuntimeError("boom")
        torch.testing.assert_close(unet(sample, t, context).sample, student, rtol=0, atol=0)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(_lora_names(unet))
    with pytest.raises(ValueError, match="add_lcm_lora"), teacher_mode(_unet()):
        pass


def test_teacher_mode_sees_through_ddp_and_compile_wrappers():
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = _unet()
    add_lcm_lora(unet, rank=2)
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    ddp_like = torch.nn.Module()
    ddp_like.module = unet
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = ddp_like
    with teacher_mode(compiled_like) as teacher:
        assert teacher is compiled_like and all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)


def test_peft_model_wrapper_gives_the_same_keys():
    """A ``get_peft_model`` UNet (``base_model.model.`` keys, as in diffusers' LCM scripts) saves the same keys."""
    from peft import get_peft_model

    ours = _unet()
    add_lcm_lora(ours, rank=2)
    wrapped = get_peft_model(_unet(), make_lora_config(rank=2))
    assert set(lora_state_dict(wrapped)) == set(lora_state_dict(ours))
    with teacher_mode(wrapped):
        assert not any(p.requires_grad for p in wrapped.parameters())
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == set(_lora_names(wrapped))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=-4), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=()), "target_modules"),
        (dict(target_modules="to_q"), "target_modules"),
    ],
)
def test_make_lora_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_lora_config(**kwargs)


def test_make_lora_config_defaults():
    config = make_lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 64, 0.0)
    assert set(config.target_modules) == set(LCM_LORA_TARGET_MODULES)
    with pytest.raises(ValueError, match="rank"):
        add_lcm_lora(_unet(), rank=0)


def _images(pipe, unet=None) -> np.ndarray:
    if unet is not None:
        pipe.unet = unet
    gen = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=1, generator=gen, output_type="np").images


def kohya_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The kohya-ss names of a diffusers UNet's Linear / Conv2d modules by the documented rule (sd-scripts'
    ``LoRANetwork``, ComfyUI's ``model_lora_keys_unet``): ``lora_unet_`` + the dotted module path, ``.`` -> ``_``."""
    named = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {"lora_unet_" + n.replace(".", "_"): m for n, m in named.items()}
    assert len(names) == len(named)  # the rule names each module once (no two paths collapse)
    return names


def check_kohya_layout(state: dict[str, torch.Tensor], unet: torch.nn.Module, rank: int, alpha: float) -> set[str]:
    """Every key of ``state`` is ``<kohya name of a module of unet>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha``, each named module has all three, shaped for that module; returns the module names."""
    modules = kohya_modules(unet)
    named: dict[str, set[str]] = {}
    for key in state:
        name, _, kind = key.partition(".")
        assert name in modules, f"{key} names no Linear/Conv2d module of the UNet"
        named.setdefault(name, set()).add(kind)
    for name, kinds in named.items():
        assert kinds == {"lora_down.weight", "lora_up.weight", "alpha"}, (name, kinds)
        down, up, a = (state[f"{name}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
        weight = modules[name].weight
        assert down.shape == (rank, *weight.shape[1:]) and up.shape[:2] == (weight.shape[0], rank), name
        assert a.ndim == 0 and float(a) == alpha
    return set(named)


@contextmanager
def diffusers_warnings():
    """Collects the messages diffusers logs at WARNING or above (its loggers do not propagate to the root)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


CONTRACT = SamplingContract("lcm", 4, None, {"gamma": 0.3}, (4.0, 4.0))


@pytest.fixture(scope="module")
def saved_lora(tiny_sd_dir, tmp_path_factory):
    """An LCM-LoRA (rank 4, alpha 8: scale 2, so a lost alpha shows) saved in both layouts with a sampling contract,
    one stock pipeline, and the images of the base pipeline and of the pipeline with the in-memory peft UNet."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    add_lcm_lora(unet, rank=4, alpha=8)
    _randomise_lora_b(unet)
    out = tmp_path_factory.mktemp("lora")
    paths = save_lora(unet, out, peft_layout=True, metadata=CONTRACT.as_metadata())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base_unet, base = pipe.unet, _images(pipe)
    with torch.no_grad():
        peft_images = _images(pipe, unet)
    pipe.unet = base_unet
    return dict(unet=unet, dir=out, paths=paths, base=base, peft=peft_images, pipe=pipe)


@pytest.fixture
def stock_pipe(saved_lora):
    """The stock pipeline of ``saved_lora``; LoRAs loaded in a test are unloaded after it."""
    yield saved_lora["pipe"]
    saved_lora["pipe"].unload_lora_weights()
    assert not _lora_names(saved_lora["pipe"].unet)


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_save_lora_writes_both_layouts_atomically_with_metadata(saved_lora):
    out, paths = saved_lora["dir"], saved_lora["paths"]
    assert [p.name for p in paths] == [LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    peft = load_file(paths[1])
    expected = lora_state_dict(saved_lora["unet"])
    assert set(peft) == set(expected) and all(k.startswith("unet.") and ".lora_" in k for k in peft)
    assert all(torch.equal(peft[k], expected[k].cpu()) for k in peft)
    default, peft_meta = _metadata(paths[0]), _metadata(paths[1])
    for meta in (default, peft_meta):
        assert (meta["lcm_kit.rank"], float(meta["lcm_kit.alpha"])) == ("4", 8.0)
        assert SamplingContract.from_json(meta["lcm_kit.sampling"]) == CONTRACT
    adapter = json.loads(peft_meta["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 8.0)
    # diffusers refuses a file with both alpha tensors and adapter metadata ("Both `network_alphas` and `metadata`
    # cannot be specified"): the kohya-layout file carries the alpha in its tensors only
    assert "lora_adapter_metadata" not in default


def test_default_file_is_the_kohya_layout_named_from_the_unet_modules(saved_lora, tiny_sd_dir):
    state = load_file(saved_lora["paths"][0])
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")  # no adapter: the plain module tree
    names = check_kohya_layout(state, base, rank=4, alpha=8.0)
    adapted = {n.rsplit(".lora_", 1)[0] for n in _lora_names(saved_lora["unet"])}
    assert names == {"lora_unet_" + n.replace(".", "_") for n in adapted}  # every adapted module, nothing else
    peft = adapter_state_dict(saved_lora["unet"], "default")  # the same tensors, renamed
    for key, value in peft.items():
        module, _, kind = key.rpartition(".lora_")
        kohya = "lora_unet_" + module.replace(".", "_") + (".lora_down" if kind == "A.weight" else ".lora_up")
        assert torch.equal(state[kohya + ".weight"], value)


def test_stock_diffusers_loads_every_tensor_of_the_default_file(stock_pipe, saved_lora):
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    pipe = stock_pipe
    with diffusers_warnings() as warned:
        pipe.load_lora_weights(saved_lora["dir"])  # the default file, kohya layout
    # no unexpected / missing / unconverted keys; diffusers notes that the file holds no text-encoder LoRA: it doesn't
    assert [w for w in warned if not w.startswith("No LoRA keys associated to CLIPTextModel")] == []
    (adapter,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    ours = adapter_state_dict(saved_lora["unet"], "default")
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)
    scalings = [m.scaling[adapter] for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(scalings) == len(ours) // 2 and set(scalings) == {2.0}  # alpha 8 / rank 4 survived
    images = _images(pipe)
    assert np.abs(images - saved_lora["base"]).max() > 1e-3  # 100x the tolerance below
    np.testing.assert_allclose(images, saved_lora["peft"], rtol=0, atol=1e-5)


def test_peft_layout_file_loads_in_diffusers_to_the_same_images(stock_pipe, saved_lora):
    pipe = stock_pipe
    pipe.load_lora_weights(saved_lora["dir"], weight_name=PEFT_WEIGHT_NAME)
    assert len(_lora_names(pipe.unet)) == len(load_file(saved_lora["paths"][1]))
    np.testing.assert_allclose(_images(pipe), saved_lora["peft"], rtol=0, atol=1e-5)


def test_to_kohya_keys_and_back():
    state = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": torch.ones(2, 8),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": torch.ones(8, 2),
        "base_model.model.up_blocks.0.upsamplers.0.conv.lora_A.weight": torch.ones(2, 16, 3, 3),
    }
    kohya = to_kohya(state, alpha=2.0)
    assert set(kohya) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha",
        "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv.alpha",
    }
    alpha = kohya["lora_unet_up_blocks_0_upsamplers_0_conv.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and float(alpha) == 2.0
    with pytest.raises(ValueError, match="lora_A"):
        to_kohya({"unet.conv_in.weight": torch.ones(1)}, alpha=1.0)
    with pytest.raises(ValueError, match="UNet"):
        to_kohya({"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.ones(1)}, alpha=1.0)
    with pytest.raises(ValueError, match="already"):
        to_kohya(kohya, alpha=2.0)
    # back: the kohya names are not invertible by themselves ("to_out_0" vs "to_out.0"), the model's keys say which
    peft_keys = [k.removeprefix("unet.").removeprefix("base_model.model.") for k in state]
    back = to_peft(kohya, peft_keys)
    assert back.keys() == set(peft_keys) and all(back[k] is state[o] for k, o in zip(peft_keys, state, strict=True))
    older = {f"unet.{k}": v for k, v in zip(peft_keys, state.values(), strict=True)}  # the PEFT layout of older files
    assert to_peft(older, peft_keys).keys() == set(peft_keys)
    with pytest.raises(ValueError, match="lora_unet_mid_block_x"):
        to_peft({**kohya, "lora_unet_mid_block_x.lora_down.weight": torch.ones(1)}, peft_keys)
    with pytest.raises(ValueError, match="missing"):
        to_peft(kohya, [*peft_keys, "mid_block.attentions.0.proj_in.lora_A.weight"])


def test_cli_to_kohya_converts_an_older_file_exactly(saved_lora, tmp_path, capsys):
    dst = tmp_path / "kohya.safetensors"
    assert main(["to-kohya", str(saved_lora["paths"][1]), str(dst)]) == 0  # the PEFT-layout file, as older runs wrote
    assert "alpha 8" in capsys.readouterr().out
    converted, reference = load_file(dst), load_file(saved_lora["paths"][0])
    assert set(converted) == set(reference) and all(torch.equal(converted[k], reference[k]) for k in reference)
    assert _metadata(dst) == _metadata(saved_lora["paths"][0])  # rank, alpha, the sampling contract

    bare = tmp_path / "bare.safetensors"  # no metadata: alpha must be given
    save_file(load_file(saved_lora["paths"][1]), bare)
    with pytest.raises(SystemExit):
        main(["to-kohya", str(bare), str(tmp_path / "x.safetensors")])
    assert "--alpha" in capsys.readouterr().err
    assert main(["to-kohya", str(bare), str(dst), "--alpha", "8"]) == 0
    converted = load_file(dst)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    with pytest.raises(SystemExit):  # contradicts the stored alpha
        main(["to-kohya", str(saved_lora["paths"][1]), str(dst), "--alpha", "4"])
    with pytest.raises(SystemExit):  # already converted
        main(["to-kohya", str(saved_lora["paths"][0]), str(tmp_path / "y.safetensors")])
    assert "already" in capsys.readouterr().err
