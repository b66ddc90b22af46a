"""Image decoding and resizing to the sizes Qwen2.5-VL's processor would pick itself.

`smart_resize` is the processor's arithmetic: both sides multiples of 28 (patch 14 x merge 2), the pixel
count inside [min_pixels, max_pixels], aspect ratio kept as well as that allows. An image already at such
a size passes through the processor untouched, so stage 2 does the resize once, here.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageOps

FACTOR = 28
DEFAULT_MIN_PIXELS = 256 * 28 * 28
DEFAULT_MAX_PIXELS = 512 * 28 * 28
MAX_ASPECT = 200


class ImageRejected(ValueError):
    """An image that cannot be used; `reason` is the manifest status."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageRejected("extreme_aspect_ratio", f"{width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _exif_swaps_axes(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except (OSError, ValueError, SyntaxError):
        return False


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent = white, as on a product page
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img


def load_resized(source: Path | str | bytes, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_image_pixels: int = 89_478_485,
                 use_draft: bool = True) -> Image.Image:
    """Decode, orient (EXIF), flatten to RGB and resize to the processor's size. Raises ImageRejected."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if img.width * img.height > max_image_pixels:
            raise ImageRejected("decompression_bomb", f"{img.width}x{img.height}")
        swap = _exif_swaps_axes(img)
        h, w = (img.width, img.height) if swap else (img.height, img.width)
        th, tw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
        if use_draft and img.format == "JPEG":
            # DCT scaling decodes at 1/2, 1/4 or 1/8 size while staying >= the target: exact enough, much faster.
            img.draft("RGB", (th, tw) if swap else (tw, th))
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.Resampling.BICUBIC)
        return img
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:
        raise ImageRejected("decompression_bomb", str(err)) from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not_image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected("corrupt_image", str(err)) from None


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()
