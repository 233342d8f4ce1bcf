"""Shared fixtures: tiny SD-format folders built in code and saved with ``save_pretrained`` (see lcm_kit.testing)."""

from __future__ import annotations

import pytest
import torch

from lcm_kit.testing import save_tiny_sd_folder


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # One thread: the models are tiny (thread start-up costs more than it saves, and an oversubscribed 2-core machine
    # makes multi-threaded tiny ops up to 100x slower), and a fixed count keeps float reductions reproducible.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A plain SD1.x folder (no w-embedding, PNDM scheduler as SD1.5 ships), epsilon prediction."""
    return save_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    """An SD1.x folder whose UNet has a guidance-scale embedding (``time_cond_proj_dim=32``), like an LCM."""
    return save_tiny_sd_folder(tmp_path_factory.mktemp("tiny_lcm"), time_cond_proj_dim=32)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A plain SDXL folder (two text encoders, ``text_time`` UNet, Euler scheduler as SDXL base ships)."""
    from lcm_kit.testing import save_tiny_sdxl_folder

    return save_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_lcm_sdxl_dir(tmp_path_factory):
    """An SDXL folder whose UNet has a guidance-scale embedding (``time_cond_proj_dim=32``), like LCM-SDXL."""
    from lcm_kit.testing import save_tiny_sdxl_folder

    return save_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_lcm_sdxl"), time_cond_proj_dim=32)
