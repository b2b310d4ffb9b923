"""What the demo server accepts: upload size, image pixels, request size, batch size.

An upload is checked before TensorFlow sees it: the byte count first, then the image header
(Pillow reads the width and height without decoding the pixels), so a small file that would
decode to a huge bitmap (a "decompression bomb") is refused as cheaply as a large file.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

from PIL import Image

from keras_irtf.image_limits import DEFAULT_MAX_PIXELS

# Formats the exported graph decodes (tf.io.decode_image inside the export's signatures).
MODEL_FORMATS = ("JPEG", "PNG", "GIF", "BMP")


class DemoError(Exception):
    """A request the demo refuses: `status` is the HTTP status, the message says what to change."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    @property
    def message(self) -> str:
        return str(self)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024  # one encoded image
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height of one image (the exports' default too)
    max_request_bytes: int = 32 * 1024 * 1024  # one HTTP request body (base64 makes images 4/3 larger)
    max_instances: int = 64  # images or queries in one predict request
    max_k: int = 100  # results the page asks for

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be >= 1, got {getattr(self, field.name)}")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


INT_RANGES = {f"{sign}int{bits}": ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sign == "" else (0, 2**bits - 1))
              for sign in ("", "u") for bits in (8, 16, 32, 64)}


def check_int(value, where: str, low: int, high: int, note: str = "", name: str = "") -> int:
    """`value` when it is a JSON integer (not a boolean) from `low` to `high`; else DemoError 400
    naming `where` (and the input `name`) and the range (`note` says where the bounds come from).
    Called before any cast to a tensor, so that 4294967299 is refused rather than wrapped to 3 by
    an int32 conversion."""
    label = f"{where}: {name}" if name else where
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemoError(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise DemoError(f"{label} must be >= {low} and <= {high}{note}, got {value}")
    return value


def k_range(gallery_size: int, max_k: int = 0) -> tuple:
    """(low, high, note) of a retrieve `k`: from 1 to the gallery's size and to `max_k` (this
    server's limit, 0 for none)."""
    high = max(1, min(gallery_size, max_k) if max_k else gallery_size)
    note = f" (the gallery holds {gallery_size} images" + (f"; this server returns at most {max_k}" if max_k else "") + ")"
    return 1, high, note


def check_k(value, where: str, gallery_size: int, max_k: int = 0) -> int:
    """A retrieve `k`, checked by check_int against k_range."""
    return check_int(value, where, *k_range(gallery_size, max_k), name="k")


def mb_text(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MB"


def _mp(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels"


def check_image(data: bytes, limits: Limits, what: str = "the upload") -> tuple:
    """(width, height, format) of an encoded image, or DemoError (413 over a limit, 400 for bytes
    that are not an image the model can decode)."""
    if len(data) == 0:
        raise DemoError(f"{what} is empty (0 bytes): send the bytes of a JPEG, PNG, GIF or BMP file")
    if len(data) > limits.max_upload_bytes:
        raise DemoError(
            f"{what} is {mb_text(len(data))}; this server accepts images up to {mb_text(limits.max_upload_bytes)} "
            f"(demo option --max-upload-mb)", status=413)
    try:
        # Image.open reads the header only. Pillow's own pixel check (a warning past
        # Image.MAX_IMAGE_PIXELS, an error past twice that) is superseded by ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                fmt = im.format
    except Image.DecompressionBombError as e:
        raise DemoError(f"{what} has too many pixels ({e}); the limit is {_mp(limits.max_pixels)}", status=413) from None
    except Exception:
        raise DemoError(f"{what} is not an image (its bytes are not a JPEG, PNG, GIF or BMP file)") from None
    if fmt not in MODEL_FORMATS:
        raise DemoError(f"{what} is a {fmt} image; the model reads JPEG, PNG, GIF or BMP: convert it first")
    if width * height > limits.max_pixels:
        raise DemoError(
            f"{what} is {width} x {height} = {_mp(width * height)}; this server accepts up to "
            f"{_mp(limits.max_pixels)} (demo option --max-megapixels): scale it down first", status=413)
    return width, height, fmt
