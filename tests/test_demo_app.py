"""The Gradio page of the demo, built in process (skipped without the optional ``demo`` extra): every input of a tab
regenerates that tab's image, and the registered function makes a frame from an editor value. The real browser
test is tests/test_demo_browser.py."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")

from lcm_kit.demo import FrameEngine  # noqa: E402
from lcm_kit.demo.app import Session, build_app  # noqa: E402


@pytest.fixture(scope="module")
def page(tiny_lcm_dir):
    session = Session(FrameEngine.load(tiny_lcm_dir, guidance_scale=3.0))
    return build_app(session, "loaded")


def _dependencies(app):
    config = app.get_config_file()
    names = {c["id"]: c.get("props", {}).get("elem_id") or c["type"] for c in config["components"]}
    for index, dep in enumerate(config["dependencies"]):
        yield index, dep, [names[i] for i in dep["inputs"]], [names[i] for i in dep["outputs"]]


TABS = [("sketch", "sketch-canvas"), ("text", None), ("inpaint", "inpaint-editor")]


@pytest.mark.parametrize(("tab", "editor"), TABS)
def test_every_input_change_regenerates_its_tab(page, tab, editor):
    live = [(d, ins) for _, d, ins, outs in _dependencies(page) if outs == [f"{tab}-output", f"{tab}-status"]
            and d["trigger_mode"] == "always_last"]  # fmt: skip
    assert len(live) == 1
    dep, inputs = live[0]
    assert sorted(target[0] for target in dep["targets"]) == sorted(dep["inputs"])  # each input's change
    assert all(event == "change" for _, event in dep["targets"])
    assert (inputs[0] == editor) if editor else "textbox" in inputs


def test_sketch_event_makes_a_frame(page):
    index = next(i for i, _, ins, _ in _dependencies(page) if ins and ins[0] == "sketch-canvas")
    canvas = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line((5, 5, 60, 40), fill=(0, 0, 0, 255), width=5)
    image, line = page.fns[index].fn({"composite": canvas}, "a red cat", 0.8, 4, 0)
    assert image.size == (256, 256) and "ms per frame" in line
    image, line = page.fns[index].fn({"composite": None}, "a red cat", 0.8, 4, 0)
    assert image is None and "the canvas is empty" in line
