"""Decode, validate, resize and re-encode one image: the per-record work of the prepare stage.

Kept free of Ray so the same function runs inside Ray Data tasks, in the benchmark's plain loop
and in unit tests. Images are resized once here (shorter side to `size`, centre crop to a square),
so training never pays for decoding full-size TIFFs again.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Modes that carry an RGB picture in another encoding: converted, not rejected.
CONVERTIBLE_MODES = frozenset({"L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1"})
ENCODINGS = {"jpeg": "JPEG", "png": "PNG"}
# rsray's own limit, checked from the header before any pixel is decoded: below Pillow's bomb
# warning (Image.MAX_IMAGE_PIXELS, ~89 MP; files past it are rejected as too large as well), so a
# huge file is a clear rejection, never a warning or gigabytes of RAM in a Ray worker.
# 64 MP = 8000 x 8000; `prepare.max_image_pixels` changes it.
MAX_PIXELS = 64_000_000


class ImageRejected(ValueError):
    """This image cannot be used; the message is the reason recorded in the manifest."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and return an RGB image; images of
    more than `max_pixels` are rejected from their header, before decoding."""
    if not data:
        raise ImageRejected("empty image file")
    try:
        with warnings.catch_warnings():  # Pillow warns (and, at twice its limit, refuses) on open
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageRejected(
                f"image too large: {image.width}x{image.height} is above prepare.max_image_pixels={max_pixels}"
            )
        image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"image too large: {exc}") from None
    except UnidentifiedImageError:  # Pillow's message names the buffer's address: a new reason each run
        raise ImageRejected("cannot decode image: not a format Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"cannot decode image: {exc}") from None
    if image.mode == "RGB":
        return image
    if image.mode in CONVERTIBLE_MODES:
        return image.convert("RGB")
    raise ImageRejected(f"unsupported image mode {image.mode} (expected RGB or a mode convertible to RGB)")


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then centre crop: remote-sensing tiles are square or nearly so."""
    if image.size == (size, size):
        return image
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def encode_image(image: Image.Image, encoding: str = "jpeg", quality: int = 95) -> bytes:
    out = io.BytesIO()
    if encoding == "jpeg":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format=ENCODINGS[encoding], optimize=False)
    return out.getvalue()


def process_image(
    data: bytes, size: int, encoding: str = "jpeg", quality: int = 95, max_pixels: int = MAX_PIXELS
) -> bytes:
    """Raw file bytes -> validated, resized, re-encoded bytes (or ImageRejected with a reason)."""
    return encode_image(resize_square(decode_image(data, max_pixels), size), encoding, quality)
