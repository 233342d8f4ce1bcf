"""The Gradio page of ``python -m lcm_kit.demo``: a sketch canvas (image-to-image), text-to-image and inpainting,
each regenerated on every change, with the time per frame under the image.

The per-frame work is :class:`lcm_kit.demo.frames.FrameEngine` (models loaded once, prompt embeddings cached); this
module only lays out the page and turns a ``ValueError`` (bad input, a missing model folder) into a message shown in
the page instead of a traceback. Gradio is an optional extra (``pip install -e ".[demo]"``); it is imported here
only, with its analytics off and no share link.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import canvas
from .frames import MAX_STEPS, Frame, FrameEngine

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home (before gradio is imported)

DISPLAY_SIZE = 256  # outputs are shown enlarged, pixel for pixel (nearest neighbour)
CANVAS_SIZE = 256  # the drawing canvas, resized to the model's size per frame
DEFAULT_PROMPT = "red apple"
BRUSH_COLORS = ("#000000", "#e53935", "#fb8c00", "#fdd835", "#43a047", "#1e88e5", "#8d6e63")


@dataclass
class Session:
    """The page's model: a loaded engine, or the message saying why none is loaded."""

    engine: FrameEngine | None = None
    error: str | None = None

    def load(self, model: str | Path, lora: str | Path | None = None, guidance_scale: float | None = None) -> str:
        """Loads a model (keeping the old one if this fails); returns the status line for the page."""
        try:
            self.engine = FrameEngine.load(model, lora or None, guidance_scale)
            self.error = None
        except ValueError as err:
            self.error = f"Could not load the model: {err}"
            return self.error
        lora_note = f" + LoRA {lora}" if lora else ""
        return f"Loaded {model}{lora_note} ({self.engine.size}x{self.engine.size} px, guidance " \
               f"{self.engine.guidance_scale:g})"  # fmt: skip

    def frame(self, make: Callable[[FrameEngine], Frame]) -> tuple[Image.Image | None, str]:
        """Runs one frame: ``(enlarged image, time line)``, or ``(None, message)`` for bad input or no model."""
        if self.engine is None:
            return None, f"**{self.error or 'No model loaded'}**"
        try:
            frame = make(self.engine)
        except ValueError as err:
            return None, f"**{err}**"
        return frame.image.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.NEAREST), frame.caption()


def sketch_frame(session: Session, value: canvas.EditorValue | None, prompt: str, strength: float, steps: int,
                 seed: int) -> tuple[Image.Image | None, str]:  # fmt: skip
    """One sketch-to-image frame from the canvas' editor value."""
    return session.frame(lambda e: e.sketch_to_image(canvas.sketch_image(value, e.size), prompt, strength, steps,
                                                     seed))  # fmt: skip


def text_frame(session: Session, prompt: str, steps: int, seed: int) -> tuple[Image.Image | None, str]:
    """One text-to-image frame."""
    return session.frame(lambda e: e.text_to_image(prompt, steps, seed))


def inpaint_frame(session: Session, value: canvas.EditorValue | None, prompt: str, steps: int,
                  seed: int) -> tuple[Image.Image | None, str]:  # fmt: skip
    """One inpainting frame from the editor value (background = image, painted layers = the part to repaint)."""
    return session.frame(lambda e: e.inpaint(*canvas.inpaint_inputs(value, e.size), prompt, steps, seed))


def _controls(gr: Any, strength: bool) -> list[Any]:
    controls = [gr.Textbox(DEFAULT_PROMPT, label="Prompt")]
    if strength:
        controls.append(gr.Slider(0.05, 1.0, 0.8, step=0.05, label="Strength"))
    controls.append(gr.Slider(1, MAX_STEPS, MAX_STEPS, step=1, label="Steps"))
    controls.append(gr.Number(0, label="Seed", precision=0, minimum=0))
    return controls


def _tab(gr: Any, name: str, make_editor: Callable[[], Any] | None, strength: bool,
         fn: Callable[..., tuple[Image.Image | None, str]]) -> tuple[Any, list[Any], list[Any]]:  # fmt: skip
    """One tab: inputs on the left, the image and its time line on the right, regenerated on every input change
    (``always_last``: a change made during a frame runs once that frame ends). All tabs share one worker."""
    with gr.Row():
        with gr.Column():
            editor = make_editor() if make_editor is not None else None
            controls = _controls(gr, strength)
        with gr.Column():
            output = gr.Image(label="Output", type="pil", format="png", elem_id=f"{name}-output", interactive=False,
                              height=DISPLAY_SIZE + 40)  # fmt: skip
            timing = gr.Markdown(elem_id=f"{name}-status")
    inputs, outputs = ([editor] if editor is not None else []) + controls, [output, timing]
    gr.on([c.change for c in inputs], fn, inputs, outputs, trigger_mode="always_last", show_progress="hidden",
          concurrency_id="frames", concurrency_limit=1)  # fmt: skip
    return editor, inputs, outputs


def _brush(gr: Any) -> Any:
    """A thick brush in a few emoji colours (Gradio's sketchpad default is a fixed black pen)."""
    return gr.Brush(default_size=14, colors=list(BRUSH_COLORS), default_color=BRUSH_COLORS[1], color_mode="defaults")


def build_app(session: Session, status: str) -> Any:
    """The page: three tabs over one :class:`Session`, and ``status`` (the load result) at the top."""
    import gradio as gr

    with gr.Blocks(title="lcm_kit live demo", analytics_enabled=False) as app:
        gr.Markdown("# lcm_kit: real-time sketch-to-image\nEvery change regenerates the image.")
        gr.Markdown(status, elem_id="load-status")
        with gr.Tab("Sketch"):
            _tab(gr, "sketch", lambda: gr.Sketchpad(
                type="pil", image_mode="RGBA", canvas_size=(CANVAS_SIZE, CANVAS_SIZE), format="png", label="Canvas",
                elem_id="sketch-canvas", layers=False, transforms=(), brush=_brush(gr)), True,
                lambda *a: sketch_frame(session, *a))  # fmt: skip
        with gr.Tab("Text to image"):
            _, text_inputs, text_outputs = _tab(gr, "text", None, False, lambda *a: text_frame(session, *a))
        with gr.Tab("Inpainting"):
            editor, _, _ = _tab(gr, "inpaint", lambda: gr.ImageEditor(
                type="pil", image_mode="RGBA", format="png", label="Image (paint over the part to repaint)",
                elem_id="inpaint-editor", sources=("upload", "clipboard"), layers=False, transforms=()), False,
                lambda *a: inpaint_frame(session, *a))  # fmt: skip
            gr.Button("Use the text-to-image output").click(
                lambda im: {"background": im, "layers": [], "composite": im}, text_outputs[:1], [editor])
        app.load(lambda *a: text_frame(session, *a), text_inputs, text_outputs)
    return app
