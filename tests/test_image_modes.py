"""load_image reads every PIL mode and bit depth by its real range, from memory and from files; refuses what
has no meaning (NaN, infinite, negative or over-16-bit integers, floats outside [0, 1], LAB) with a clear error."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from seg4diff_fast.segmentation.images import load_image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)

# 8-bit modes: the reading equals PIL's own RGB conversion / 255 (PIL converts these exactly)
EIGHT_BIT = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV"]
# file formats that store each mode (round trip through the file)
FILE_FORMAT = {"1": "png", "L": "png", "LA": "png", "P": "png", "RGB": "png", "RGBA": "png",
               "CMYK": "tiff", "YCbCr": "tiff", "I": "tiff", "I;16": "png", "I;16B": "tiff", "F": "tiff",
               "RGBX": "tiff"}


def _eight_bit(mode):
    im = Image.fromarray(RGB)
    if mode == "P":
        return im.convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    if mode == "PA":
        return im.convert("P").convert("PA")
    return im.convert(mode)


@pytest.mark.parametrize("mode,source", [(m, "memory") for m in EIGHT_BIT]
                         + [(m, "file") for m in EIGHT_BIT if m in FILE_FORMAT])
def test_eight_bit_modes(mode, source, tmp_path):
    im = _eight_bit(mode)
    expected = torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255).permute(2, 0, 1)
    if source == "file":
        path = tmp_path / f"x.{FILE_FORMAT[mode]}"
        im.save(path)
        assert Image.open(path).mode in (mode, {"RGBX": "RGB"}.get(mode, mode))
        got = load_image(str(path))
    else:
        got = load_image(im)
    assert got.shape == (3, 9, 13) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_modes_with_colours_are_read_as_colours():
    # a pure red in HSV, YCbCr and CMYK comes back red (not the raw channel bytes)
    for mode, value in [("HSV", (0, 255, 255)), ("CMYK", (0, 255, 255, 0))]:
        got = load_image(Image.new(mode, (3, 2), value))
        torch.testing.assert_close(got[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    got = load_image(Image.new("RGB", (3, 2), (255, 0, 0)).convert("YCbCr"))
    assert got[0, 0, 0] > 0.95 and got[1:, 0, 0].max() < 0.05


@pytest.mark.parametrize("mode,dtype,scale", [("I;16", np.uint16, 65535), ("I;16B", ">u2", 65535),
                                              ("I", np.int32, 65535)])
@pytest.mark.parametrize("source", ["memory", "file"])
def test_sixteen_bit_gradient_keeps_its_range(mode, dtype, scale, source, tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).astype(np.int64).reshape(48, 64)
    im = Image.fromarray(ramp.astype(np.uint16)) if mode != "I" else Image.fromarray(ramp.astype(np.int32))
    if mode == "I;16B":
        im = Image.frombytes("I;16B", (64, 48), ramp.astype(">u2").tobytes())
    assert im.mode == mode
    if source == "file":
        path = tmp_path / f"g.{FILE_FORMAT[mode]}"
        im.save(path)
        im = str(path)
    got = load_image(im)
    expected = torch.from_numpy(ramp / scale).float().expand(3, -1, -1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got >= 0.999).float().mean() < 0.01  # not the 99.6 % white of an 8-bit reading


def test_float_tiff_read_as_stored(tmp_path):
    ramp = np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    got = load_image(str(tmp_path / "f.tif"))
    torch.testing.assert_close(got[0], torch.from_numpy(ramp))


@pytest.mark.parametrize("values,match", [
    (np.array([[0.0, np.nan]], np.float32), "NaN or infinite"),
    (np.array([[0.0, np.inf]], np.float32), "NaN or infinite"),
    (np.array([[0.0, 255.0]], np.float32), r"float pixels must be in \[0, 1\]"),
    (np.array([[-0.5, 0.5]], np.float32), r"float pixels must be in \[0, 1\]"),
])
def test_bad_float_tiff_refused(tmp_path, values, match):
    Image.fromarray(values, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(ValueError, match=match):
        load_image(str(tmp_path / "bad.tif"), "IMAGE")


@pytest.mark.parametrize("arr,expected_scale", [
    (np.array([[0, 300, 65535]], np.int32), 65535),  # above 255: read as 16-bit, not saturated
    (np.array([[0, 17, 255]], np.int64), 255),
    (np.array([[0, 17, 255]], np.uint8), 255),
    (np.array([[0, 17, 255]], np.uint16), 65535),  # uint16 is 16-bit whatever its values
    (np.array([[True, False]]), 1),
])
def test_integer_arrays_by_range(arr, expected_scale):
    got = load_image(arr)
    torch.testing.assert_close(got[0], torch.from_numpy(arr.astype(np.float64) / expected_scale).float())


@pytest.mark.parametrize("arr,match", [
    (np.array([[-1, 5]], np.int32), "must not be negative"),
    (np.array([[0, 70000]], np.int64), "fit neither 8 nor 16 bits"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 5), np.uint8), r"\[H, W, 1\|2\|3\|4\]"),
    (np.array([["a"]]), "not an image"),
])
def test_bad_arrays_refused(arr, match):
    with pytest.raises(ValueError, match=match):
        load_image(arr)


def test_tensors_nan_bf16_and_layouts():
    with pytest.raises(ValueError, match="NaN"):
        load_image(torch.full((3, 4, 4), float("nan")))
    x = torch.rand(3, 5, 7)
    torch.testing.assert_close(load_image(x.bfloat16()), x.bfloat16().float())
    torch.testing.assert_close(load_image(x.permute(1, 2, 0)), x)  # [H, W, 3]
    torch.testing.assert_close(load_image(x[None]), x)  # [1, 3, H, W]
    torch.testing.assert_close(load_image(x[0]), x[0].expand(3, -1, -1))  # grey
    with pytest.raises(ValueError, match="tensor must be"):
        load_image(torch.rand(5, 6, 7))


def test_lab_and_unconvertible_modes_refused():
    with pytest.raises(ValueError, match="LAB"):
        load_image(Image.new("LAB", (4, 4)))
    with pytest.raises(ValueError, match="mode 'La'"):
        load_image(Image.new("La", (4, 4)))


def test_files_that_are_not_images(tmp_path):
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(str(tmp_path / "t.png"))
    with pytest.raises(ValueError, match="is a folder"):
        load_image(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "nope.png"))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32,
                                         np.float64]),
                  shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.sampled_from([1, 2, 3, 4])),
                  elements=None))
def test_any_array_is_read_exactly_or_refused(arr):
    """Every array either comes back as its values over its real scale, or raises a ValueError: never clipped."""
    try:
        got = load_image(arr)
    except ValueError:
        kind = arr.dtype.kind
        if kind == "f":
            assert not np.isfinite(arr).all() or arr.min() < -1e-3 or arr.max() > 1 + 1e-3
        else:
            assert arr.dtype.itemsize > 2 and (arr.min() < 0 or arr.max() > 65535)
        return
    c = arr[:, :, :1] if arr.shape[2] in (1, 2) else arr[:, :, :3]
    if arr.dtype == np.uint8 or (arr.dtype.itemsize > 2 and arr.max() <= 255):
        scale = 255.0
    elif arr.dtype.kind in "ui":
        scale = 65535.0
    else:
        scale = 1.0
    want = torch.from_numpy(np.clip(c.astype(np.float64) / scale, 0, 1)).float().permute(2, 0, 1).expand(3, -1, -1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# EXIF orientation (tag 0x0112) -> how a viewer turns the stored pixels [H, W, C] (the EXIF 2.3 table), in numpy
VIEWED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, k=-1),
          7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, k=1)}


@pytest.mark.parametrize("fmt", ["png", "jpeg"])  # (PIL turns a TIFF by its orientation tag itself)
@pytest.mark.parametrize("orientation", sorted(VIEWED))
def test_exif_orientation_is_applied(tmp_path, orientation, fmt):
    from seg4diff_fast.segmentation.images import image_size, read_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(RGB).save(path, exif=exif, **({"quality": 95} if fmt == "jpeg" else {}))
    with Image.open(path) as im:  # what was stored, decoded (JPEG is lossy), not turned
        stored = np.asarray(im.convert("RGB"))
    viewed = np.ascontiguousarray(VIEWED[orientation](stored))
    expected = torch.from_numpy(viewed.astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(load_image(str(path)), expected, rtol=0, atol=0)
    assert image_size(str(path)) == viewed.shape[:2]
    im = read_image(str(path))
    assert im.getexif().get(0x0112, 1) == 1  # the tag removed: turning it again is a no-op
    torch.testing.assert_close(load_image(im), expected, rtol=0, atol=0)
