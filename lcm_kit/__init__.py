"""lcm_kit: Latent Consistency Models for diffusers."""

from .pipeline import LCMPipeline
from .scheduler import LCMKitScheduler, LCMKitSchedulerOutput

__all__ = ["LCMKitScheduler", "LCMKitSchedulerOutput", "LCMPipeline"]
