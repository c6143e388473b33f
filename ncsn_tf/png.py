"""PNG images and grids with NumPy and the standard library only (no TensorFlow): the layout of
every grid the project writes, and what the serving client decodes and writes with.

Covers what the project meets: 8-bit, non-interlaced grey, grey+alpha, RGB and RGBA images
(what `tf.io.encode_png` and most tools write), alpha dropped on reading.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

# Grids show every image at least this many pixels tall (nearest-neighbour, integer factor):
# a 16-px digit becomes a readable 64-px tile.
MIN_TILE = 64
SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # colour type -> samples per pixel


def upscale_factor(height: int, min_tile: int = MIN_TILE) -> int:
    """The integer factor that makes an image `height` pixels tall at least `min_tile`."""
    return max(1, math.ceil(min_tile / height))


def grid(images: np.ndarray, ncol: int | None = None, padding: int = 2,
         min_tile: int = MIN_TILE) -> np.ndarray:
    """uint8 [rows·(H+pad)+pad, ncol·(W+pad)+pad, C] grid of uint8 images [N, H, W, C] (`ncol`
    columns, default ⌈√N⌉; black padding), each enlarged by nearest neighbour to at least
    `min_tile` pixels tall (0: never)."""
    images = np.asarray(images, np.uint8)
    n, h, w, c = images.shape
    if min_tile:
        factor = upscale_factor(h, min_tile)
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
        h, w = h * factor, w * factor
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = np.zeros((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        out[top:top + h, left:left + w] = image
    return out


def encode(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image, C in 1 to 4."""
    image = np.asarray(image, np.uint8)
    height, width, channels = image.shape
    colour = {v: k for k, v in _CHANNELS.items()}[channels]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    return (SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


def decode(data: bytes) -> np.ndarray:
    """uint8 [H, W, C] (C = 1 or 3: alpha dropped) from PNG bytes; ValueError when they are
    not a PNG this module reads (see the module docstring)."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG (no PNG signature)")
    chunks, position, header = [], len(SIGNATURE), None
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if len(body) < length:
            break
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
        position += 12 + length
    if header is None or not chunks:
        raise ValueError("a damaged PNG (no header or no image data)")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace:
        raise ValueError(f"a PNG of bit depth {depth}, colour type {colour}, interlace "
                         f"{interlace}: only 8-bit non-interlaced grey/RGB(A) is read")
    channels = _CHANNELS[colour]
    try:
        raw = zlib.decompress(b"".join(chunks))
    except zlib.error as e:
        raise ValueError(f"a damaged PNG ({e})") from None
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError("a damaged PNG (image data of the wrong length)")
    image = _unfilter(np.frombuffer(raw, np.uint8).reshape(height, stride + 1), channels)
    image = image.reshape(height, width, channels)
    return image[..., :-1] if channels in (2, 4) else image


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undoes the per-row filters (none, sub, up, average, Paeth) of the PNG spec."""
    out = np.zeros((rows.shape[0], rows.shape[1] - 1), np.int32)
    previous = np.zeros(rows.shape[1] - 1, np.int32)
    for y, row in enumerate(rows):
        kind, line = row[0], row[1:].astype(np.int32)
        if kind == 0:
            current = line
        elif kind == 2:
            current = (line + previous) & 0xFF
        elif kind in (1, 3, 4):  # depend on the bytes just decoded: byte by byte
            current = line.copy()
            for x in range(len(line)):
                left = current[x - bpp] if x >= bpp else 0
                up, corner = previous[x], previous[x - bpp] if x >= bpp else 0
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + up) // 2
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                current[x] = (current[x] + predictor) & 0xFF
        else:
            raise ValueError(f"a damaged PNG (row filter {kind})")
        out[y] = previous = current
    return out.astype(np.uint8)
