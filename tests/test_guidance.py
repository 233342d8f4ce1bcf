"""lcm_kit.guidance: the one decision between w-embedding, batched CFG and no guidance."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.pipelines.latent_consistency_models import LatentConsistencyModelPipeline

from lcm_kit import functional as F
from lcm_kit.guidance import Guidance, default_guidance_scale, has_w_embedding
from lcm_kit.testing import tiny_unet_config

LCM_CONFIG = {"time_cond_proj_dim": 32, "sample_size": 8}
PLAIN_CONFIG = {"time_cond_proj_dim": None, "sample_size": 8}


@pytest.mark.parametrize(
    "config, scale, mode, evals",
    [
        (LCM_CONFIG, 8.5, "w_embedding", 1),
        (LCM_CONFIG, 1.0, "w_embedding", 1),  # the w-embedding at w = 0: still no unconditional pass
        (PLAIN_CONFIG, 2.0, "cfg", 2),
        (PLAIN_CONFIG, 1.0, "none", 1),
        (PLAIN_CONFIG, 0.5, "none", 1),
    ],
)
def test_three_modes(config, scale, mode, evals):
    g = Guidance.decide(config, scale)
    assert (g.mode, g.scale, g.unet_evals_per_step, g.do_cfg) == (mode, scale, evals, mode == "cfg")
    assert g.w == F.guidance_w(scale) and isinstance(g.w, float)
    assert (g.embedding_dim is not None) == (mode == "w_embedding")
    assert (g.negative_prompt_unused_reason() is None) == (mode == "cfg")


def test_defaults_lcm_unet_8_5_plain_unet_1():
    assert default_guidance_scale(LCM_CONFIG) == Guidance.decide(LCM_CONFIG).scale == 8.5
    assert default_guidance_scale(PLAIN_CONFIG) == Guidance.decide(PLAIN_CONFIG).scale == 1.0
    assert Guidance.decide(PLAIN_CONFIG).mode == "none" and Guidance.decide(LCM_CONFIG).w == 7.5


def test_reads_real_unet_configs_and_attribute_objects():
    lcm = UNet2DConditionModel(**tiny_unet_config(time_cond_proj_dim=32)).config
    plain = UNet2DConditionModel(**tiny_unet_config()).config
    assert has_w_embedding(lcm) and not has_w_embedding(plain)
    assert Guidance.decide(lcm, 3.0).embedding_dim == 32 and Guidance.decide(plain, 3.0).mode == "cfg"
    assert Guidance.decide(SimpleNamespace(time_cond_proj_dim=16), 2.0).mode == "w_embedding"
    assert Guidance.decide({}, 2.0).mode == "cfg"  # a config without the key is a plain UNet


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_names_guidance_scale(bad):
    for config in (LCM_CONFIG, PLAIN_CONFIG):
        with pytest.raises(ValueError, match="guidance_scale"):
            Guidance.decide(config, bad)


def test_frozen_and_validated():
    g = Guidance.decide(PLAIN_CONFIG, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.scale = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="mode"):
        Guidance("classifier_free", 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding_dim"):
        Guidance("w_embedding", 2.0)
    assert Guidance("cfg", 2.0) == g


def test_embedding_matches_diffusers():
    g = Guidance.decide(LCM_CONFIG, 6.0)
    emb = g.embedding(3)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((3,), 5.0), embedding_dim=32)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    assert Guidance.decide(PLAIN_CONFIG, 6.0).embedding(3) is None
