"""Pixel limits: read an image's width and height from its header, before decoding it.

A 379 KB PNG can declare 20000 x 20000 pixels; decoding it allocates 1.2 GB (and the float copy
for resizing four times that), enough to abort a serving process. The dimensions sit in the first
bytes of every format the exports accept, so they are read from there and an image over the limit
is refused before any pixel is decoded:

    PNG   IHDR width, height: big-endian uint32 at bytes 16..24
    GIF   logical screen width, height: little-endian uint16 at bytes 6..10
    BMP   width, height: little-endian int32 at bytes 18..26 (height < 0 = top-down rows)
    JPEG  the first start-of-frame marker (SOF0..SOF15 but DHT, JPG, DAC): height, width as
          big-endian uint16 at 5..9 bytes after the marker; found by walking the segments

Two implementations of the same rules: `image_dimensions_graph` (TensorFlow ops, inside the
exported graph) and `image_dimensions` (plain Python, for tools/query.py and the data loaders).
"""

from __future__ import annotations

import struct

import tensorflow as tf

DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels (e.g. 8000 x 5000): far above any dataset image
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit."""


def too_large_message(max_pixels: int) -> str:
    return (f"image_bytes: the image has more than {int(max_pixels)} pixels (the export's pixel limit, "
            f"max_pixels); send a smaller image or re-export with a higher --max-pixels")


# ---- plain Python ---------------------------------------------------------------------------------
def image_dimensions(data: bytes):
    """(width, height) from the header of a PNG, GIF, BMP or JPEG, or None when the bytes are not
    one of those or the header is cut short."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:4] == b"GIF8" and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:3] == b"\xff\xd8\xff":
        pos, n = 2, len(data)
        while pos + 9 <= n:
            if data[pos] != 0xFF:
                pos += 1  # stray byte between segments (decoders skip them too)
                continue
            marker = data[pos + 1]
            if marker == 0xFF:
                pos += 1  # fill byte
            elif marker in _JPEG_SOF:
                h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return w, h
            elif marker in _JPEG_STANDALONE:
                pos += 2
            else:
                pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        return None
    return None


def check_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image"):
    """Raise ImageTooLarge when the header of `data` declares more than `max_pixels` pixels.
    Bytes whose dimensions cannot be read pass (the decoder then reports them)."""
    dims = image_dimensions(data)
    if dims is not None and max_pixels and dims[0] * dims[1] > max_pixels:
        raise ImageTooLarge(
            f"{name}: {dims[0]} x {dims[1]} = {dims[0] * dims[1]} pixels is over the limit of {int(max_pixels)} "
            f"pixels (decoding it would take {dims[0] * dims[1] * 3 / 2**30:.1f} GiB)"
        )
    return dims


def check_image_file(path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """check_image_bytes on the first 64 KB of a file (enough for any header before a JPEG's SOF
    in practice; a JPEG whose SOF lies further is read whole)."""
    with open(path, "rb") as f:
        head = f.read(65536)
        if head[:3] == b"\xff\xd8\xff" and image_dimensions(head) is None:
            head += f.read()
    return check_image_bytes(head, max_pixels, str(path))


# ---- inside a TensorFlow graph -------------------------------------------------------------------
def image_dimensions_graph(data):
    """(width, height) int64 scalars from a scalar string tensor of PNG, GIF, BMP or JPEG bytes;
    (-1, -1) when they cannot be read."""
    def raw(offset, length):
        # bytes [offset, offset + length) as int64; the caller checks that they exist
        return tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8), tf.int64)

    def be(b):
        out = tf.constant(0, tf.int64)
        for i in range(b.shape[0]):
            out = out * 256 + b[i]
        return out

    def le(b):
        return be(tf.reverse(b, [0]))

    n = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 8)
    unknown = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64))

    def png():
        b = tf.reshape(raw(16, 8), [8])
        return be(b[:4]), be(b[4:])

    def gif():
        b = tf.reshape(raw(6, 4), [4])
        return le(b[:2]), le(b[2:])

    def bmp():
        b = tf.reshape(raw(18, 8), [8])

        def signed(v):
            return tf.where(v >= 2**31, 2**32 - v, v)  # |int32|

        return signed(le(b[:4])), signed(le(b[4:]))

    def jpeg():
        b = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int64)
        sof = tf.constant(sorted(_JPEG_SOF), tf.int64)
        standalone = tf.constant(sorted(_JPEG_STANDALONE), tf.int64)

        def cond(pos, w, h, done):
            return tf.logical_and(tf.logical_not(done), pos + 9 <= tf.size(b, out_type=tf.int64))

        def body(pos, w, h, done):
            marker = b[pos + 1]
            is_ff = tf.equal(b[pos], 255)
            is_sof = tf.logical_and(is_ff, tf.reduce_any(tf.equal(sof, marker)))
            step = tf.where(
                tf.logical_not(is_ff) | tf.equal(marker, 255), tf.constant(1, tf.int64),
                tf.where(tf.reduce_any(tf.equal(standalone, marker)), tf.constant(2, tf.int64),
                         2 + b[pos + 2] * 256 + b[pos + 3]))
            new_h = b[pos + 5] * 256 + b[pos + 6]
            new_w = b[pos + 7] * 256 + b[pos + 8]
            return (tf.where(is_sof, pos, pos + step), tf.where(is_sof, new_w, w), tf.where(is_sof, new_h, h),
                    is_sof)

        _, w, h, _ = tf.while_loop(
            cond, body, (tf.constant(2, tf.int64), unknown[0], unknown[1], tf.constant(False)),
            maximum_iterations=1 << 20)
        return w, h

    branches = [
        (tf.logical_and(tf.equal(head, b"\x89PNG\r\n\x1a\n"), n >= 24), png),
        (tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), b"GIF8"), n >= 10), gif),
        (tf.logical_and(tf.equal(tf.strings.substr(head, 0, 2), b"BM"), n >= 26), bmp),
        (tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"), jpeg),
    ]
    out = unknown
    for predicate, fn in reversed(branches):
        out = tf.cond(predicate, fn, lambda out=out: out)
    return out


def assert_pixel_limit_graph(data, max_pixels: int):
    """An op that fails with INVALID_ARGUMENT (naming the limit) when the header of `data` declares
    more than `max_pixels` pixels, or a JPEG whose dimensions cannot be found (it could be any size)."""
    w, h = image_dimensions_graph(data)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    unreadable_jpeg = tf.logical_and(is_jpeg, w < 0)
    pixels = tf.cast(w, tf.float64) * tf.cast(h, tf.float64)  # no int64 overflow for 2^32-wide claims
    ok = tf.logical_and(tf.logical_not(unreadable_jpeg), pixels <= float(max_pixels))
    return tf.debugging.Assert(ok, [too_large_message(max_pixels), "width", w, "height", h], summarize=4)


# ---- empty batches --------------------------------------------------------------------------------
def empty_batch_guard(batch, dim: int, compute):
    """`compute()` (a float32 [B, dim] tensor) when `batch` has entries, else float32 [0, dim]:
    some kernels (oneDNN convolutions, batch normalisation) reject a batch of 0 with a shape error,
    while a client sending no images should get no embeddings."""
    return tf.cond(tf.size(batch) > 0, compute, lambda: tf.zeros([0, int(dim)], tf.float32))
