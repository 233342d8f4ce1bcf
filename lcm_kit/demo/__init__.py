"""A live web demo (``python -m lcm_kit.demo``): sketch-to-image, text-to-image and inpainting, regenerated on every
change. :mod:`.frames` and :mod:`.canvas` hold the per-frame logic (no web framework); :mod:`.app` the Gradio page
(the optional ``demo`` extra); :mod:`.cli` the command line."""

from .canvas import inpaint_inputs, sketch_image
from .frames import Frame, FrameEngine

__all__ = ["Frame", "FrameEngine", "inpaint_inputs", "sketch_image"]
