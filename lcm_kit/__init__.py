"""lcm_kit: Latent Consistency Models for diffusers."""

from .contract import SamplingContract
from .edit import LCMEditPipeline
from .guidance import Guidance
from .pipeline import LCMPipeline
from .pipeline_xl import LCMXLPipeline
from .scheduler import LCMKitScheduler, LCMKitSchedulerOutput

__all__ = [
    "Guidance",
    "LCMEditPipeline",
    "LCMKitScheduler",
    "LCMKitSchedulerOutput",
    "LCMPipeline",
    "LCMXLPipeline",
    "SamplingContract",
]
