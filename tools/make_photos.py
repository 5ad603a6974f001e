"""Write the example photos in ``workflows/`` from scikit-image's bundled sample data.

Run ``python tools/make_photos.py [path/to/scikit_image-*.whl]``.  Without a wheel it runs
``pip download scikit-image==0.26.0 --no-deps`` into a temporary folder (the package index is
the only network this needs; ComfyUI never runs this).  The output is deterministic.

Every photo's licence, as stated in scikit-image 0.26.0's ``skimage/data/_fetchers.py``
docstrings (checked for this release):

| file | scikit-image name | licence (as stated there) |
|---|---|---|
| ``photoops_cat.jpg`` | ``chelsea`` | CC0 by the photographer (Stefan van der Walt) |
| ``photoops_coffee.jpg`` | ``coffee`` | CC0 by the photographer (Rachel Michetti) |
| ``photoops_rocket.jpg`` | ``rocket`` | public domain (SpaceX) |
| ``photoops_astronaut.jpg`` | ``astronaut`` | public domain (NASA) |
| ``photoops_brick.jpg`` | ``brick`` | CC0 (CC0Textures, Bricks25) |

InstructBrush's before/after pairs (``instructbrush_before_N.jpg`` / ``instructbrush_after_N.jpg``)
are the cat, the coffee and the rocket, centre-cropped to a square and resized to 512 px, and the
same images through :func:`vintage`: a deterministic warm sepia tone with faded blacks and a soft
vignette, the kind of look a user asks for ("make it look like an old photo").
"""
from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE = "scikit-image==0.26.0"
PHOTOS = {"photoops_cat.jpg": "chelsea.png", "photoops_coffee.jpg": "coffee.png",
          "photoops_rocket.jpg": "rocket.jpg", "photoops_astronaut.jpg": "astronaut.png",
          "photoops_brick.jpg": "brick.png"}
PAIRS = ("chelsea.png", "coffee.png", "rocket.jpg")
PAIR_SIZE = 512
QUALITY = 90


def vintage(img: Image.Image) -> Image.Image:
    """Warm sepia (the classic sepia matrix), blacks lifted to 8 %, a vignette down to 80 % at the corners."""
    x = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    sepia = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    y = np.clip(x @ sepia.T, 0.0, 1.0)
    y = 0.08 + 0.92 * y
    h, w = y.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2)) / np.sqrt(2)
    y = y * (1.0 - 0.2 * r[..., None] ** 2)
    return Image.fromarray(np.round(np.clip(y, 0, 1) * 255).astype(np.uint8))


def square(img: Image.Image, size: int = PAIR_SIZE) -> Image.Image:
    img = img.convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def _wheel() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    tmp = Path(tempfile.mkdtemp(prefix="photoops-skimage-"))
    subprocess.run([sys.executable, "-m", "pip", "download", SKIMAGE, "--no-deps", "-d", str(tmp)], check=True)
    return next(tmp.glob("scikit_image-*.whl"))


def _save(img: Image.Image, name: str) -> None:
    path = ROOT / "workflows" / name
    img.convert("RGB").save(path, quality=QUALITY, optimize=True)
    print("wrote", path, img.size)


def main():
    with zipfile.ZipFile(_wheel()) as z:
        def load(name):
            return Image.open(io.BytesIO(z.read(f"skimage/data/{name}")))

        for out, src in PHOTOS.items():
            _save(load(src), out)
        for i, src in enumerate(PAIRS, 1):
            before = square(load(src))
            _save(before, f"instructbrush_before_{i}.jpg")
            _save(vintage(before), f"instructbrush_after_{i}.jpg")


if __name__ == "__main__":
    main()
