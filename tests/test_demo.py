"""The live demo's per-frame path (lcm_kit.demo.frames / canvas / app.Session), without a browser, on the tiny LCM
folder (16x16 images; random weights, so only equalities with the pipeline and the messages are meaningful).

Expected images come from :class:`lcm_kit.LCMEditPipeline` called directly with the same prompt, seed and settings:
the demo's cached embeddings and long-lived scheduler must not change a single pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lcm_kit import LCMEditPipeline
from lcm_kit.demo import FrameEngine, inpaint_inputs, sketch_image
from lcm_kit.demo.app import Session, sketch_frame, text_frame

PROMPT = "a red cat"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tiny_lcm_dir):
    return FrameEngine.load(tiny_lcm_dir, guidance_scale=3.0)


def _stroke(size: int = 64, box=(8, 8, 40, 56)) -> Image.Image:
    """A transparent canvas with one red stroke, as the sketchpad sends it."""
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line(box, fill=(255, 0, 0, 255), width=6)
    return canvas


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_frames_equal_the_pipeline_called_directly(engine, tiny_lcm_dir):
    pipe, size = LCMEditPipeline.from_pretrained(tiny_lcm_dir), engine.size  # not the engine's (FramePipeline)
    pipe.set_progress_bar_config(disable=True)
    sketch = sketch_image({"composite": _stroke()}, size)
    expected = pipe(PROMPT, image=sketch, strength=0.6, num_inference_steps=3, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    for _ in range(2):  # the second frame reads the cached embeddings
        frame = engine.sketch_to_image(sketch, PROMPT, 0.6, 3, 5)
        np.testing.assert_array_equal(_pixels(frame.image), _pixels(expected))
    assert frame.unet_passes == 3 and frame.seconds > 0
    expected = pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(engine.text_to_image(PROMPT, 2, 1).image), _pixels(expected))


def test_prompt_is_encoded_once_and_nothing_is_rebuilt(engine):
    calls = []
    hook = engine.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    scheduler, sketch = engine.pipe.scheduler, sketch_image(_stroke(), engine.size)
    try:
        for seed in range(3):
            engine.sketch_to_image(sketch, "a prompt seen once", 0.8, 2, seed)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert engine.pipe.scheduler is scheduler
    assert engine.pipe.__dict__["_fixed_device"] == torch.device("cpu")  # looked up once, then kept


def test_sketch_changes_the_frame(engine):
    size = engine.size
    first = engine.sketch_to_image(sketch_image(_stroke(), size), PROMPT, 0.8, 4, 0).image
    second = engine.sketch_to_image(sketch_image(_stroke(box=(50, 4, 10, 60)), size), PROMPT, 0.8, 4, 0).image
    assert np.abs(_pixels(first) - _pixels(second)).max() > 0


def test_inpaint_frame_keeps_the_unpainted_pixels(engine):
    size = engine.size
    background = engine.text_to_image(PROMPT, 4, 0).image.resize((64, 64), Image.Resampling.NEAREST)
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((0, 0, 31, 63), fill=(0, 0, 0, 255))  # the left half is repainted
    image, mask = inpaint_inputs({"background": background, "layers": [layer]}, size)
    assert np.array_equal(np.asarray(mask) > 127, np.arange(size)[None, :].repeat(size, 0) < size // 2)
    out = _pixels(engine.inpaint(image, mask, "a blue dog", 2, 3).image)
    np.testing.assert_allclose(out[:, size // 2 :], _pixels(image)[:, size // 2 :], atol=1)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "the canvas is empty"),
        ({"composite": Image.new("RGBA", (64, 64))}, "the canvas is empty"),
        ({"composite": _stroke().crop((0, 0, 64, 40))}, "64x40 px: it must be square"),
        ({"composite": _stroke().resize((8, 8))}, "at least the model's 16x16"),
    ],
)
def test_bad_canvas_is_a_message(value, message):
    with pytest.raises(ValueError, match=message):
        sketch_image(value, 16)


@pytest.mark.parametrize(
    ("layers", "background", "message"),
    [
        ([], None, "no image to inpaint"),
        ([], Image.new("RGBA", (64, 64)), "no image to inpaint"),
        ([], Image.new("RGB", (64, 64), "blue").convert("RGBA"), "nothing to repaint"),
        ([_stroke(32)], _stroke(), "layer 0 is"),
    ],
)
def test_bad_inpaint_input_is_a_message(layers, background, message):
    with pytest.raises(ValueError, match=message):
        inpaint_inputs({"background": background, "layers": layers}, 16)


def test_session_shows_messages_not_tracebacks(engine, tmp_path):
    session = Session()
    status = session.load(tmp_path / "missing")
    assert "Could not load the model" in status and "does not exist" in status
    assert text_frame(session, PROMPT, 4, 0) == (None, f"**{status}**")
    assert "not a diffusers pipeline folder" in session.load(tmp_path)
    session.engine = engine
    image, line = sketch_frame(session, {"composite": Image.new("RGBA", (64, 64))}, PROMPT, 0.8, 4, 0)
    assert image is None and "the canvas is empty" in line
    assert "steps must be an integer from 1 to 4" in text_frame(session, PROMPT, 5, 0)[1]
    assert "prompt is empty" in text_frame(session, " ", 4, 0)[1]
    image, line = text_frame(session, PROMPT, 4, 0)
    assert image.size == (256, 256) and "ms per frame (4 UNet passes, 16x16 px)" in line


def test_tcd_lora_inpaints_with_plain_lcm_sampling():
    """The committed LCM-LoRA's contract sets TCD gamma 0.3; inpainting needs gamma None, and sampling keeps 0.3."""
    engine = FrameEngine.load(REPO / "models/tiny-emoji-sd", REPO / "models/tiny-emoji-lcm-lora")
    assert engine.guidance_scale == 1.0 and engine.pipe.scheduler.config.gamma == 0.3
    image = engine.text_to_image("red apple", 1, 0).image
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, 16, 32))
    frame = engine.inpaint(image, mask, "green apple", 1, 0)
    assert frame.unet_passes == 1 and engine.pipe.scheduler.config.gamma == 0.3
