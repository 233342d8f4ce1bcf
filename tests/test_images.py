"""lcm_kit.images.to_rgb: 16-bit and float images scaled to 8 bits, transparency flattened onto white.

Expected pixels are computed in each test from the input array: 16-bit values map to 8 bits by ``v * 255 / 65535``
(= ``v / 257``), rounded; a pixel of opacity ``a`` over white is ``c * a + 255 * (1 - a)``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lcm_kit.data import decode_image
from lcm_kit.images import to_rgb

# a 16-bit ramp over the full range, with the end points 0 and 65535 and a mid value 128 * 257 = 32896
RAMP16 = np.concatenate([np.linspace(0, 65535, 62).round(), [32896, 65535]]).astype(np.uint16).reshape(8, 8)
EXPECTED8 = np.repeat(np.rint(RAMP16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)


def _sixteen_bit(mode: str) -> Image.Image:
    """RAMP16 in a Pillow high-bit-depth mode (built from raw bytes: Pillow's convert clips I;16 -> I;16B at 255)."""
    if mode in ("I;16", "I;16L"):
        return Image.frombytes(mode, (8, 8), RAMP16.astype("<u2").tobytes())
    if mode == "I;16B":
        return Image.frombytes(mode, (8, 8), RAMP16.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(RAMP16.astype(np.int32))
    assert mode == "F"
    return Image.fromarray(RAMP16.astype(np.float32))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I", "F"])
def test_high_bit_depth_is_scaled_to_8_bits(mode):
    image = _sixteen_bit(mode)
    assert image.mode == mode
    out = to_rgb(image)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), EXPECTED8)  # 65535 -> 255, 32896 -> 128, 0 -> 0


def test_float_image_in_unit_range_is_scaled_by_255():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = np.asarray(to_rgb(Image.fromarray(values, mode="F")))
    np.testing.assert_array_equal(out[..., 0], np.rint(values * 255).astype(np.uint8))


def test_16_bit_png_file_round_trip():
    buf = io.BytesIO()
    _sixteen_bit("I;16").save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as image:
        assert image.mode in ("I;16", "I")  # how Pillow opens a 16-bit grayscale PNG
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), EXPECTED8)


@pytest.mark.parametrize("kind", ["path", "bytes", "pil"])
def test_training_data_decoding_scales_16_bit(tmp_path, kind):
    path = tmp_path / "sixteen.png"
    _sixteen_bit("I;16").save(path)
    raw = {"path": str(path), "bytes": None} if kind == "path" else {"bytes": path.read_bytes(), "path": None}
    if kind == "pil":
        raw = Image.open(path)
    np.testing.assert_array_equal(np.asarray(decode_image(raw)), EXPECTED8)


def _rgba() -> np.ndarray:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255  # fully transparent and fully opaque rows
    return rgba


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_flattened_onto_white(mode):
    rgba = _rgba()
    image = Image.fromarray(rgba).convert(mode) if mode == "LA" else Image.fromarray(rgba)
    colour = np.asarray(image.convert("RGB"), dtype=np.float64)  # the colour channels, alpha dropped
    out = np.asarray(to_rgb(image))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_allclose(out, _over_white(colour, rgba[..., 3]), atol=1)  # alpha_composite rounds
    assert (out[0] == 255).all()  # transparent -> white, whatever colour was stored under it
    np.testing.assert_array_equal(out[1], colour[1])  # opaque -> unchanged


def test_palette_with_transparent_index_is_flattened_onto_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0  # index 0 (black) is transparent
    out = np.asarray(to_rgb(image))
    assert (out[0, 0] == 255).all() and out[1, 1].tolist() == [200, 10, 30]


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "L", "YCbCr", "1"])
def test_opaque_modes_use_pillows_conversion(mode):
    image = Image.fromarray(_rgba()[..., :3]).convert(mode)
    out = to_rgb(image)
    assert out is not image and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image.convert("RGB")))
