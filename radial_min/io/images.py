"""Images for ViT, prepared as Hugging Face's ViTImageProcessor does: RGB, resize (bilinear), x 1/255, then
(x - mean) / std per channel, as [C, H, W] float32.

The processor resizes with Pillow, whose "bilinear" is an antialiased triangle filter whose support widens
when shrinking, computed in 22-bit fixed point on 8-bit images. We reimplement that filter in NumPy, so
`.npy` images need no Pillow and 8-bit photos come out bit-identical to Pillow's resize. Pillow is only needed
to decode PNG/JPEG files.
"""

import io
import struct
import warnings
from pathlib import Path

import numpy as np

from ..config import check_field
from ..errors import RadialError
from .outputs import npy_header, present, read_bytes, read_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit resampling


MAX_PIXELS = 50_000_000  # ~7000x7000; Pillow's own bomb limit is 89M (warning) and 179M (error)
MAX_FILE_BYTES = 1 << 28  # an image file (PNG, JPEG, ...) read whole before Pillow decodes it


def side_limit(image_size: int) -> int:
    """The longest side an image for a model of `image_size` pixels may have: 4096 (a 16-megapixel photo), or four
    times the model's side for a larger model. Anything larger is refused before a pixel is decoded: a model of 224
    pixels needs none of it, and a 143 KB PNG of zeros can declare 7000x7000 (under Pillow's own bomb limits)."""
    return max(4096, 4 * image_size)


def read_image(path, max_side: int | None = None) -> np.ndarray:
    """An image file as [H, W, 3]: uint8 from PNG/JPEG (Pillow), uint8 or float in 0..255 from .npy. Larger than
    `max_side` on a side (or MAX_PIXELS in all), refused from its header.

    Grayscale is repeated to three channels and an alpha channel dropped, as Pillow's convert("RGB") does.
    """
    path = Path(path)
    if not present(path):  # a folder or FIFO named like an image is refused by name
        raise RadialError(f"{path}: no such image file")
    if path.suffix.lower() == ".npy":
        try:
            with open(path, "rb") as f:
                shape, _ = npy_header(f, path.stat().st_size)  # before anything is allocated for it
            _check_size(path, shape[1] if len(shape) > 1 else 1, shape[0] if shape else 1, max_side)
            a = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:  # an empty file is an EOFError
            raise RadialError(f"{path}: not a readable .npy array ({e})") from None
    else:
        data = read_bytes(path, RadialError, MAX_FILE_BYTES)
        _check_tiff_directories(data, path)  # a corrupt file is refused as corrupt, Pillow or not
        try:
            from PIL import Image
        except ImportError:
            raise RadialError(
                f"{path}: reading {path.suffix} images needs Pillow (pip install 'radial_min[images]'), "
                "or pass a .npy array"
            ) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a bomb or corrupt-EXIF warning: we say what matters ourselves
                # from the bytes, not the file: Pillow asks the file for as many bytes as a chunk's length field
                # says (a 90-byte PNG can say 2 GB), and a file's read(n) allocates n first; a buffer's does not
                with Image.open(io.BytesIO(data)) as im:  # reads the header only: bound the pixels first
                    _check_size(path, im.width, im.height, max_side)
                    a = np.asarray(im.convert("RGB"))
        except RadialError:
            raise
        except Exception as e:  # Pillow's decoders raise OSError, ValueError (a truncated .ppm), SyntaxError, ...
            raise RadialError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:120]})") from None
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.dtype.kind not in "uif" or 0 in a.shape:
        raise RadialError(f"{path}: expected an [H, W], [H, W, 3] or [H, W, 4] image, got {a.dtype}{list(a.shape)}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise RadialError(f"{path}: has NaN or infinite pixel values")
    if a.dtype != np.uint8 and a.size and not 0 <= a.min() <= a.max() <= 255:  # [0, 1] floats would pass: can't tell
        raise RadialError(f"{path}: pixel values run from {a.min():g} to {a.max():g}, expected 0..255")
    return a[:, :, :3]


def _check_size(path, width: int, height: int, max_side: int | None) -> None:
    if max_side is not None and max(width, height) > max_side:
        raise RadialError(
            f"{path}: image is {width}x{height}, over {max_side:,} pixels a side (the limit for this model): "
            "downscale it first"
        )
    if width * height > MAX_PIXELS:
        raise RadialError(f"{path}: image is {width}x{height}, over the {MAX_PIXELS:,}-pixel limit")


def _check_tiff_directories(data: bytes, path) -> None:
    """A TIFF's chain of image directories (IFDs), followed from the header: each in the file, none visited twice.
    Pillow stops quietly at a directory that points back to itself or an earlier one; a file like that is corrupt."""
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(data[:4])
    if order is None or len(data) < 8:
        return
    (offset,), seen = struct.unpack(order + "I", data[4:8]), set()
    while offset:
        if offset in seen or offset + 2 > len(data) or len(seen) >= 4096:
            why = "loops back to an earlier one" if offset in seen else "points outside the file"
            raise RadialError(f"{path}: not a readable image (TIFF: its image directory at byte {offset} {why})")
        seen.add(offset)
        (n,) = struct.unpack(order + "H", data[offset : offset + 2])
        at = offset + 2 + 12 * n
        if at + 4 > len(data):
            raise RadialError(f"{path}: not a readable image (TIFF: truncated in its image directory at {offset})")
        (offset,) = struct.unpack(order + "I", data[at : at + 4])


def _taps(n_in: int, n_out: int):
    """Pillow's bilinear resampling weights, by bands: output i reads inputs starts[i]..starts[i] + m - 1 with
    weights k[i] (each row sums to 1; zero past its band). The triangle filter has support 1, widened when shrinking
    (antialiasing), so a band holds ~2 * n_in / n_out inputs: never the dense [n_out, n_in] matrix."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    bands = []
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        x = (np.arange(lo, hi) - center + 0.5) / filterscale
        k = np.maximum(1.0 - np.abs(x), 0.0)
        bands.append((lo, k / k.sum()))
    m = max(len(k) for _, k in bands)
    k = np.zeros((n_out, m), np.float64)
    for i, (_, band) in enumerate(bands):
        k[i, : len(band)] = band
    return np.array([lo for lo, _ in bands], np.int64), k


def _coefficients(n_in: int, n_out: int) -> np.ndarray:
    """The weights of `_taps` as a dense [n_out, n_in] matrix (rows sum to 1): the float path's."""
    starts, k = _taps(n_in, n_out)
    w = np.zeros((n_out, n_in), np.float64)
    for i, lo in enumerate(starts):
        n = min(k.shape[1], n_in - lo)
        w[i, lo : lo + n] = k[i, :n]
    return w


def _resample_8bit(a, starts, k):
    """One pass along axis 0 in Pillow's fixed point: round the weights, accumulate in integers, clip to 0..255.
    Band by band, so the integer copy is one band of rows, not the image."""
    scaled = k * (1 << _PRECISION_BITS)
    k = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    out = np.empty((len(starts),) + a.shape[1:], np.uint8)
    for i, lo in enumerate(starts):
        rows = a[lo : lo + k.shape[1]]
        acc = np.tensordot(k[i, : len(rows)], rows.astype(np.int64), axes=(0, 0)) + (1 << (_PRECISION_BITS - 1))
        out[i] = np.clip(acc >> _PRECISION_BITS, 0, 255)
    return out


def resize(image, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [H, W, C] image as Pillow (13) does it, in two passes rounded to 8 bits in between.

    Pillow runs the horizontal pass first, except when the height shrinks by more than twice as many pixels as
    the width does (h - height > 2 * (w - width)): then the vertical pass goes first. The order changes the 8-bit
    intermediate, so we follow it. (Rule inferred by comparing with Pillow 13.0 over thousands of shapes;
    Pillow 12 and older always went horizontal first, so there some shapes can differ by 1.)
    """
    h, w = image.shape[:2]
    eight_bit = image.dtype == np.uint8
    out = image if eight_bit else image.astype(np.float64)

    def horizontal(a):
        if a.shape[1] == width:
            return a
        a = a.transpose(1, 0, 2)  # [W, H, C]: resample along axis 0
        if eight_bit:
            a = _resample_8bit(a, *_taps(a.shape[0], width))
        else:
            a = np.tensordot(_coefficients(a.shape[0], width), a, axes=(1, 0))
        return a.transpose(1, 0, 2)

    def vertical(a):
        if a.shape[0] == height:
            return a
        if eight_bit:
            return _resample_8bit(a, *_taps(a.shape[0], height))
        return np.tensordot(_coefficients(a.shape[0], height), a, axes=(1, 0))

    if height < h and h - height > 2 * (w - width):
        return horizontal(vertical(out))
    return vertical(horizontal(out))


def read_preprocessor(folder, image_size: int) -> dict:
    """The settings of `preprocessor_config.json` we use, with ViTImageProcessor's defaults, each checked."""
    path = Path(folder) / "preprocessor_config.json"
    d = read_json(path, RadialError, "a JSON object of settings") if present(path) else {}
    if d.get("resample", 2) != 2:
        raise RadialError(
            f"{path}: resample {d['resample']!r:.40} is not supported (only 2, Pillow's bilinear, as ViT uses)"
        )
    size = d.get("size", image_size)
    if isinstance(size, dict) and set(size) <= {"height", "width"}:
        size = (size.get("height", image_size), size.get("width", image_size))
    elif isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise RadialError(
            f"{path}: field 'size' is {size!r:.40}, expected an integer, [height, width] or "
            '{"height": .., "width": ..}'
        )
    size = tuple(check_field(str(path), "size", n, int, 1, 4096) for n in size)
    out = {"size": size}
    for key in ("do_resize", "do_rescale", "do_normalize"):
        out[key] = check_field(str(path), key, d.get(key, True), bool)
    factor = d.get("rescale_factor", 1 / 255)
    out["rescale_factor"] = check_field(str(path), "rescale_factor", factor, float, 1e-30, 1e6)
    for key, name, low in (("image_mean", "mean", -1e6), ("image_std", "std", 1e-6)):  # finite pixels, always
        values = d.get(key, [0.5, 0.5, 0.5])
        values = [values] * 3 if isinstance(values, (int, float)) else values
        if not isinstance(values, list) or len(values) != 3:
            raise RadialError(f"{path}: field {key!r} is {values!r:.40}, expected 3 numbers (one per channel)")
        out[name] = np.array([check_field(str(path), key, v, float, low, 1e6) for v in values], np.float32)
    return out


def model_pixels(path, settings: dict, image_size: int) -> np.ndarray:
    """The image file at `path` as a ViT of `image_size` takes it, [3, S, S], or one error naming the file."""
    x = preprocess(read_image(path, side_limit(image_size)), settings)
    if x.shape[1:] != (image_size, image_size):
        why = "its field 'size' is" if settings["do_resize"] else "do_resize is false, and the image is"
        raise RadialError(
            f"{path}: the model takes {image_size}x{image_size} pixels; preprocessor_config.json: {why} "
            f"{x.shape[2]}x{x.shape[1]}"
        )
    return x


def preprocess(image: np.ndarray, settings: dict) -> np.ndarray:
    """[H, W, 3] (0..255) -> pixel values [3, H', W'] float32, as ViTImageProcessor computes them."""
    x = resize(image, *settings["size"]) if settings["do_resize"] else image
    x = x.astype(np.float32)
    if settings["do_rescale"]:
        x = x * np.float32(settings["rescale_factor"])
    if settings["do_normalize"]:
        x = (x - settings["mean"]) / settings["std"]
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def list_images(source) -> list[Path]:
    """Image files of a folder (sorted), or the one file given."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise RadialError(f"{source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not source.is_file():
        raise RadialError(f"{source}: no such image file or folder")
    return [source]
