"""Per-image work of the prepare stage: decode, validate mode, resize, re-encode."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from rsray.data.images import MAX_PIXELS, ImageRejected, decode_image, encode_image, process_image, resize_square


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def rgb(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    assert decode_image(encoded(rgb(), fmt)).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_convertible_modes_become_rgb(mode):
    image = rgb().convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    assert decode_image(encoded(image, fmt)).mode == "RGB"


def test_sixteen_bit_image_is_rejected_with_mode_in_reason():
    image = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    data = encoded(image, "TIFF")
    with pytest.raises(ImageRejected, match="unsupported image mode I;16"):
        decode_image(data)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty image file"),
        (b"not an image at all", "cannot decode image"),
    ],
)
def test_garbage_is_rejected(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_image(data)


def test_the_reason_for_an_unidentified_file_is_the_same_every_time():
    """Pillow's own message names the address of the in-memory buffer; a manifest must not."""
    reasons = set()
    for _ in range(2):
        with pytest.raises(ImageRejected) as caught:
            decode_image(b"not an image at all" + bytes(64))
        reasons.add(str(caught.value))
    assert reasons == {"cannot decode image: not a format Pillow can identify"}


def test_truncated_jpeg_is_rejected():
    data = encoded(rgb(64, 64), "JPEG")
    with pytest.raises(ImageRejected, match="cannot decode image"):
        decode_image(data[: len(data) // 2])


def test_resize_square_crops_centre():
    image = Image.new("RGB", (60, 30), "red")
    image.paste(Image.new("RGB", (10, 30), "blue"), (0, 0))  # left sixth is blue: cropped away
    out = resize_square(image, 20)
    assert out.size == (20, 20)
    assert out.getpixel((0, 10)) == (255, 0, 0)


def test_process_image_round_trip_sizes_and_encodings():
    for encoding, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG")):
        data = process_image(encoded(rgb(50, 50), "PNG"), 32, encoding)
        assert data.startswith(magic)
        assert Image.open(io.BytesIO(data)).size == (32, 32)


def test_encoding_is_deterministic():
    image = rgb(32, 32)
    assert encode_image(image, "jpeg", 90) == encode_image(image, "jpeg", 90)


def test_images_above_the_pixel_limit_are_rejected_from_the_header():
    data = encoded(rgb(100, 80), "PNG")
    with pytest.raises(ImageRejected, match=r"image too large: 100x80 is above prepare.max_image_pixels=7999"):
        process_image(data, 32, max_pixels=7999)
    assert process_image(data, 32, max_pixels=8000)
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS  # rsray refuses before Pillow would even warn


def test_files_past_pillows_bomb_limit_are_rejected_as_too_large_not_warned_about():
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 MP in 12 kB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        with pytest.raises(ImageRejected, match="image too large: Image size"):
            decode_image(buffer.getvalue(), max_pixels=200_000_000)
