"""What a scanner does to a clean page: tinted paper, a small skew, blur, speckle, a dark border
strip, JPEG compression; and pages fed sideways or upside down.

Used by the sample dataset (its ``scans`` shard) and the benches. Everything is drawn from the
``random.Random`` passed in, so the same generator state gives the same bytes.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageFilter

SCAN_JPEG_QUALITY = 60
ROTATIONS = (0, 90, 180, 270)
# PIL transposes that turn a page counter-clockwise by a quarter turn count (upright.turn_page undoes them)
_COUNTER_CLOCKWISE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                      270: Image.Transpose.ROTATE_270}


def stored_as(page: Image.Image, rotation: int) -> Image.Image:
    """The upright ``page`` as it is stored when it needs a clockwise turn of ``rotation`` degrees
    (0/90/180/270) to be upright again, the convention of the LAYOUT ``rotation`` column: 90 gives
    a page lying on its left side (its top line runs up the left edge). ``upright.turn_page``
    with ``Turn(rotation)`` turns it back."""
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    return page.copy() if rotation == 0 else page.transpose(_COUNTER_CLOCKWISE[rotation])


def scan_page(page: Image.Image, rng: random.Random, severity: float = 1.0,
              quality: int = SCAN_JPEG_QUALITY) -> bytes:
    """JPEG bytes of ``page`` (RGB) as a flatbed scanner delivers it.

    Grey or yellowish paper with slightly lifted ink, a skew of 1-2 degrees either way (times
    ``severity``), a slight blur, grain and dust specks, on about half the pages a dark strip
    along one edge where the scanner lid ends, and JPEG at ``quality`` (60). ``severity`` above 1
    gives a badly degraded page (more skew, blur and noise) for calibration benches.
    """
    noise_seed = rng.getrandbits(32)
    grey, yellow = rng.uniform(208, 235), rng.uniform(0, 24)  # grey paper, more or less yellowed
    paper = np.array([grey, grey - 0.35 * yellow, grey - yellow], dtype=np.float32)
    ink_floor = rng.uniform(25, 55)
    angle = rng.uniform(1.0, 2.0) * severity * rng.choice((-1, 1))
    blur = rng.uniform(0.5, 0.9) * severity
    border = rng.random() < 0.5
    edge = rng.choice(("left", "right", "top", "bottom"))
    border_px = rng.randint(14, 40)

    # skew first, so the corners it uncovers take the paper's tint like the rest of the sheet
    skewed = page.convert("RGB").rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    skewed = skewed.filter(ImageFilter.GaussianBlur(blur))
    ink = np.asarray(skewed, dtype=np.float32) / 255.0
    out = ink_floor + ink * (paper - ink_floor)  # white becomes paper, black becomes the lifted ink

    noise = np.random.default_rng(noise_seed)
    height, width = out.shape[:2]
    out += noise.normal(0.0, 5.0 * severity, (height, width, 1)).astype(np.float32)
    # dust: isolated dark dots of one to a few pixels, far too small and sparse to be letters
    specks = int(height * width * 2e-4 * severity)
    ys, xs = noise.integers(0, height - 2, specks), noise.integers(0, width - 2, specks)
    sizes = noise.integers(1, 3, specks)
    for y, x, s in zip(ys.tolist(), xs.tolist(), sizes.tolist()):
        out[y:y + s, x:x + s] = noise.uniform(30, 110)
    if border:
        strip = np.linspace(35.0, 80.0, border_px, dtype=np.float32)  # darkest at the very edge
        if edge == "left":
            out[:, :border_px] = strip[None, :, None]
        elif edge == "right":
            out[:, width - border_px:] = strip[None, ::-1, None]
        elif edge == "top":
            out[:border_px] = strip[:, None, None]
        else:
            out[height - border_px:] = strip[::-1, None, None]
    scanned = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    scanned.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
