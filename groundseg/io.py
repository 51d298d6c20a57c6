"""Image loading, mask encoding, atomic output files and visual overlays.

Conventions used throughout:

* images are ``(H, W, 3)`` ``uint8`` RGB arrays;
* masks are ``(H, W)`` (or stacked ``(N, H, W)``) boolean arrays at image size;
* ``bbox`` means COCO ``[x, y, w, h]`` in pixels, ``xyxy`` means
  ``[x1, y1, x2, y2]`` with exclusive ``x2 = x1 + w`` and ``y2 = y1 + h``.

Errors caused by what the user passed in (a missing file, a corrupt image, a
malformed RLE) raise :class:`InputError`, whose message is a single line that
the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import json
import os
import secrets
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

__all__ = [
    "InputError",
    "ImageLike",
    "load_image",
    "check_image",
    "mask_to_rle",
    "rle_to_mask",
    "mask_to_bbox",
    "masks_to_boxes_xyxy",
    "atomic_write",
    "save_png_mask",
    "save_json",
    "save_jpeg",
    "overlay",
    "PALETTE",
]

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


class InputError(ValueError):
    """Bad user input; the message is one line naming the culprit and what was expected."""

    def __init__(self, message: str) -> None:
        # The CLI prints this verbatim on one line, so fold any newlines that
        # slipped in from wrapped library error messages.
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #

# Exceptions Pillow raises for unreadable, corrupt or truncated image data.
_PIL_READ_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)
# EXIF parsing failures: the orientation is metadata, so a malformed tag must
# not make an otherwise decodable image unusable.
_EXIF_ERRORS = (ValueError, TypeError, KeyError, IndexError, SyntaxError, OSError)


def load_image(image: ImageLike) -> np.ndarray:
    """Load and normalise an image to a fresh ``(H, W, 3)`` ``uint8`` RGB array.

    Accepts a file path, a ``PIL.Image`` or an array of shape ``(H, W)``,
    ``(H, W, 1)``, ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA). The EXIF
    orientation is applied, so the result is upright as a photo viewer shows it.

    Normalisation rules:

    * grayscale, 1-bit, palette, CMYK and YCbCr are converted to RGB;
    * alpha (RGBA, LA, palette transparency) is composited onto **white**, so
      transparent areas look as they do in a browser instead of turning black;
    * 16-bit data (``uint16`` arrays, modes ``I;16*`` and ``I``) is rescaled
      from 0..65535 to 0..255 (``round(v / 257)``) rather than clipped at 255
      (mode ``I`` is 32-bit; values outside 0..65535 are clipped first);
    * float data (mode ``F``, float arrays) in [0, 1] is scaled by 255; data
      outside [0, 1] is min-max stretched to 0..255.

    Raises:
        InputError: the path is missing, is a directory, or is not a readable,
            complete image; or the array has an unsupported shape or dtype.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "image array")
    if isinstance(image, Image.Image):
        where = getattr(image, "filename", "") or "PIL image"
        return _decode(image, where)
    path = _existing_file(image)
    return _decode(path, str(path))


def check_image(path: str | os.PathLike) -> None:
    """Cheaply validate that ``path`` is a readable image, without a full decode.

    Reads the header and runs Pillow's ``verify()`` (which checks e.g. PNG chunk
    CRCs). JPEG verification in Pillow is a no-op, so JPEGs are additionally
    decoded at 1/8 scale (DCT draft mode), which is fast but still reads the
    whole entropy-coded stream and so catches truncated files. Truncation in
    other formats (GIF, TIFF, WebP, ...) is only detected by :func:`load_image`.

    Raises:
        InputError: same messages as :func:`load_image`.
    """
    path = _existing_file(path)
    try:
        with Image.open(path) as img:
            img.verify()
        # verify() leaves the image unusable, so reopen for the draft decode.
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except _PIL_READ_ERRORS as exc:
        raise InputError(f"{path} is not a readable image ({_describe(exc)})") from exc


def _existing_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise InputError unless it is an existing file."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(
            f"image must be a path, numpy array or PIL.Image, got {type(path).__name__}"
        )
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p} is a directory, expected an image file")
    if not p.exists():
        raise InputError(f"image not found: {p}")
    return p


def _decode(source: Path | Image.Image, where: str) -> np.ndarray:
    """Decode and normalise an image, mapping Pillow's decoding errors to InputError."""
    try:
        if isinstance(source, Image.Image):
            return _pil_to_rgb(source, where)  # caller's image: not ours to close
        with Image.open(source) as img:
            return _pil_to_rgb(img, where)
    except InputError:
        raise  # already a precise message (e.g. unsupported mode)
    except _PIL_READ_ERRORS as exc:
        raise InputError(f"{where} is not a readable image ({_describe(exc)})") from exc


def _describe(exc: BaseException) -> str:
    """Short description of a decoding error for an InputError message."""
    return str(exc) or type(exc).__name__


def _pil_to_rgb(img: Image.Image, where: str) -> np.ndarray:
    """Decode a PIL image (upright, per EXIF) into ``(H, W, 3)`` uint8 RGB."""
    # Decode before touching EXIF so truncation surfaces as a read error here
    # rather than being mistaken for bad metadata in exif_transpose.
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except _EXIF_ERRORS:
        pass  # keep the stored orientation; see _EXIF_ERRORS
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # Pillow's own conversion to "L" clips at 255 instead of rescaling.
        data = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        return _array_to_rgb(data, where)
    if mode == "F":
        return _array_to_rgb(np.asarray(img), where)
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo it via RGBA first
        has_alpha = True
    try:
        rgb = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except ValueError as exc:  # e.g. LAB/HSV, which Pillow cannot convert directly
        raise InputError(f"{where}: unsupported image mode {mode!r} ({exc})") from exc
    return _composite_on_white(rgb) if has_alpha else np.array(rgb)


def _array_to_rgb(arr: np.ndarray, where: str) -> np.ndarray:
    """Normalise an ``(H, W)``, ``(H, W, 1|3|4)`` array to a new ``(H, W, 3)`` uint8 array."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InputError(
            f"{where} has shape {arr.shape}, expected (H, W), (H, W, 3) RGB or (H, W, 4) RGBA"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{where} has shape {arr.shape}, expected a non-empty image")
    arr = _to_uint8(arr, where)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        return _composite_on_white(arr)
    return np.array(arr, dtype=np.uint8, order="C")  # always a copy


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Map array values to uint8 by dtype convention (see :func:`load_image`)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # any byte order
        # round(v / 257) is the exact rescale: 65535 -> 255, 32896 -> 128.
        return np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InputError(
                f"{where} has {arr.dtype} values in [{lo}, {hi}], expected 0..255 "
                "(or pass uint16 for 16-bit data)"
            )
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{where} contains NaN or infinite values")
        data = arr.astype(np.float64)
        lo, hi = float(data.min()), float(data.max())
        if lo < 0.0 or hi > 1.0:
            # Unknown range (e.g. a float TIFF of depths): stretch to full scale.
            data = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
        return np.rint(data * 255.0).astype(np.uint8)
    raise InputError(f"{where} has dtype {arr.dtype}, expected uint8, uint16, bool or float")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite ``(H, W, 4)`` uint8 RGBA onto white, giving ``(H, W, 3)`` uint8."""
    rgb = rgba[:, :, :3].astype(np.float32)
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


# --------------------------------------------------------------------------- #
# Masks
# --------------------------------------------------------------------------- #


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode an ``(H, W)`` boolean mask as COCO compressed RLE.

    Returns ``{"size": [H, W], "counts": str}``, JSON-serialisable and
    readable by ``pycocotools.mask.decode``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {mask.shape}")
    # pycocotools walks pixels column-major and needs a Fortran-ordered uint8 copy.
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE into an ``(H, W)`` boolean mask.

    ``counts`` may be a compressed ``str``/``bytes`` or an uncompressed list of
    run lengths (as in COCO ``iscrowd`` annotations).

    Raises:
        InputError: ``rle`` lacks ``size``/``counts`` or has the wrong types.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError(f"RLE must be a dict with 'size' and 'counts', got {_brief(rle)}")
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise InputError(f"RLE 'size' must be [height, width], got {_brief(size)}")
    try:
        h, w = int(size[0]), int(size[1])
    except (TypeError, ValueError):
        raise InputError(f"RLE 'size' must be two integers, got {_brief(size)}") from None
    if isinstance(counts, str):
        counts = counts.encode("ascii", "replace")
    if isinstance(counts, (list, tuple)):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise InputError(
                f"RLE 'counts' list must hold non-negative integers, got {_brief(counts)}"
            )
        if sum(counts) != h * w:
            raise InputError(f"RLE counts sum to {sum(counts)}, expected {h}*{w}={h * w}")
        encoded = mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    elif isinstance(counts, bytes):
        if not counts and h * w:
            # pycocotools would return uninitialised memory for this.
            raise InputError(f"RLE 'counts' is empty for a {h}x{w} mask")
        encoded = {"size": [h, w], "counts": counts}
    else:
        raise InputError(f"RLE 'counts' must be str, bytes or list, got {type(counts).__name__}")
    try:
        return mask_utils.decode(encoded).astype(bool)
    except ValueError as exc:  # counts that do not add up to h*w pixels
        raise InputError(f"invalid RLE for size [{h}, {w}]: {exc}") from exc


def _brief(value: Any, limit: int = 60) -> str:
    """``repr`` shortened for single-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mask_to_bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of the foreground in an ``(H, W)`` mask.

    ``x, y`` is the top-left foreground pixel and ``w, h`` count pixels, so a
    lone pixel at column 3, row 5 gives ``[3, 5, 1, 1]``. Empty: ``[0, 0, 0, 0]``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {mask.shape}")
    x1, y1, x2, y2 = (int(v) for v in masks_to_boxes_xyxy(mask[None])[0])
    return [x1, y1, x2 - x1, y2 - y1]


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of ``(N, H, W)`` masks as an ``(N, 4)`` float32 ``[x1, y1, x2, y2]`` array.

    ``x2``/``y2`` are exclusive (``x2 = x1 + w``), matching :func:`mask_to_bbox`.
    Empty masks give ``[0, 0, 0, 0]``.
    """
    masks = np.asarray(masks) != 0
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    n, h, w = masks.shape
    rows = masks.any(axis=2)  # (N, H): which rows hold foreground
    cols = masks.any(axis=1)  # (N, W)
    # argmax finds the first True; on the reversed axis it finds the last one.
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    boxes[~rows.any(axis=1)] = 0.0
    return boxes.reshape(n, 4)


# --------------------------------------------------------------------------- #
# Atomic output files
# --------------------------------------------------------------------------- #


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    The temp name is ``.<stem>.<random><suffix>``: hidden, in the same directory
    (so ``os.replace`` is an atomic rename on one filesystem) and with the same
    suffix (so writers that pick the format from the extension still work). If
    the body raises, the temp file is removed and ``path`` is left untouched.
    This protects against interrupted or failed runs, not power loss (no fsync).
    """
    path = Path(path)
    # The writer creates the file itself, so it gets normal umask permissions
    # (mkstemp would create it 0600).
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # also on Ctrl-C: never leave a half-written temp file
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_png_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Atomically write an ``(H, W)`` boolean mask as a single-channel 0/255 PNG."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {mask.shape}")
    img = Image.fromarray(np.where(mask != 0, 255, 0).astype(np.uint8))  # 2-D uint8 -> mode "L"
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def save_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Atomically write an ``(H, W, 3)`` uint8 RGB image as JPEG."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    with atomic_write(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=quality)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a UTF-8 JSON file; a file that is not JSON is an :class:`InputError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from exc


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as UTF-8 JSON (2-space indent, trailing newline).

    numpy scalars and arrays are converted to Python numbers and lists.
    """
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
            f.write("\n")


def _json_default(value: Any) -> Any:
    """JSON fallback for numpy types and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --------------------------------------------------------------------------- #
# Overlay rendering
# --------------------------------------------------------------------------- #

#: RGB colours for masks/boxes, in order (Tableau 10, minus its gray).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BANNER_MAX_LINES = 4
# OpenCV 5 renders putText with a built-in Unicode font; 4.x Hershey fonts are
# ASCII-only and draw "?" for anything else, so there we fold text to ASCII,
# mapping common typographic characters first.
_CV2_UNICODE_TEXT = int(cv2.__version__.split(".")[0]) >= 5
_ASCII_FOLD = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
     "\u2014": "-", "\u2026": "...", "\u00a0": " "}
)


def overlay(
    image_rgb: np.ndarray,
    masks: np.ndarray | None,
    text: str | None = None,
    phrases: Sequence[str | None] | None = None,
    boxes: np.ndarray | None = None,
) -> np.ndarray:
    """Render masks, boxes, labels and an answer banner onto a copy of an image.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB (anything :func:`load_image` accepts).
        masks: ``(N, H, W)`` or ``(H, W)`` boolean masks, or None. Mask ``i``
            is filled with ``PALETTE[i % len(PALETTE)]`` at alpha 0.5 and outlined.
        text: answer text, drawn white on a dark band across the top, word-wrapped
            to the width, at most 4 lines (the last ending in "..." if cut).
        phrases: optional label per item ``i`` (None entries are skipped), drawn
            at box ``i``'s top-left if there is one, else at mask ``i``'s.
        boxes: optional ``(M, 4)`` ``[x1, y1, x2, y2]`` boxes (exclusive
            ``x2``/``y2``), each drawn in the colour of mask ``i``.

    Returns:
        A new ``(H, W, 3)`` uint8 RGB array; the input is not modified.
    """
    canvas = load_image(image_rgb)  # always a fresh copy
    h, w = canvas.shape[:2]
    masks = _as_mask_stack(masks, (h, w))
    boxes = np.asarray([] if boxes is None else boxes, dtype=np.float64).reshape(-1, 4)
    n_items = max(len(masks), len(boxes))
    if phrases is not None and len(phrases) != n_items:
        raise ValueError(f"got {len(phrases)} phrases for {n_items} masks/boxes")

    thickness = max(1, round(min(h, w) / 300))  # contours and boxes
    for i, mask in enumerate(masks):
        color = PALETTE[i % len(PALETTE)]
        # Exact 50/50 blend in integers; uint16 keeps the sum from overflowing.
        canvas[mask] = ((canvas[mask].astype(np.uint16) + color) // 2).astype(np.uint8)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(canvas, contours, -1, color, thickness)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        # cv2.rectangle's second corner is inclusive, ours is exclusive.
        pt1 = (round(x1), round(y1))
        pt2 = (max(pt1[0], round(x2) - 1), max(pt1[1], round(y2) - 1))
        cv2.rectangle(canvas, pt1, pt2, PALETTE[i % len(PALETTE)], thickness)

    scale = _font_scale(w)
    lines = _wrap_banner(text, w, h, scale) if text else []
    banner_h = _banner_height(lines, scale)
    if phrases is not None:
        anchors, visible = _label_anchors(masks, boxes, n_items)
        for i, phrase in enumerate(phrases):
            if phrase and visible[i]:
                x, y = anchors[i]
                # Keep labels below the banner, which is drawn last and would hide them.
                _draw_label(canvas, _drawable(phrase), x, max(y, banner_h),
                            PALETTE[i % len(PALETTE)], scale * 0.7)
    if lines:
        _draw_banner(canvas, lines, scale, banner_h)
    return canvas


def _as_mask_stack(masks: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Return masks as an ``(N, H, W)`` bool array, checking they match the image size."""
    if masks is None:
        return np.zeros((0, *hw), dtype=bool)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != hw:
        raise ValueError(f"masks must have shape (N, {hw[0]}, {hw[1]}), got {masks.shape}")
    return masks != 0


def _label_anchors(
    masks: np.ndarray, boxes: np.ndarray, n: int
) -> tuple[list[tuple[int, int]], list[bool]]:
    """Top-left ``(x, y)`` per item (box if present, else mask) and whether it has one."""
    anchors, visible = [(0, 0)] * n, [False] * n
    for i, (x1, y1, _, _) in enumerate(masks_to_boxes_xyxy(masks)):
        anchors[i], visible[i] = (int(x1), int(y1)), bool(masks[i].any())
    for i, (x1, y1, _, _) in enumerate(boxes):
        anchors[i], visible[i] = (round(x1), round(y1)), True
    return anchors, visible


def _drawable(text: str) -> str:
    """``text`` as cv2.putText can draw it: unchanged on OpenCV 5, ASCII-folded on 4.x."""
    if _CV2_UNICODE_TEXT:
        return text
    text = unicodedata.normalize("NFKD", text.translate(_ASCII_FOLD))
    text = "".join(c for c in text if not unicodedata.combining(c))  # "e\u0301" -> "e"
    return text.encode("ascii", "replace").decode("ascii")


def _font_scale(width: int) -> float:
    """Hershey font scale for an image ``width`` px wide.

    Scale 1.0 is ~22 px (OpenCV 4) to ~27 px (OpenCV 5) of glyph height, so
    width/1000 gives ~20 px text on an 800 px image and ~45 px at 1800 px;
    the floor keeps text on 64 px images at ~10 px, the smallest that reads.
    """
    return max(0.4, width / 1000.0)


def _thickness(scale: float) -> int:
    return max(1, round(scale * 1.6))


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, _FONT, scale, _thickness(scale))[0][0]


def _padding(scale: float) -> int:
    return max(2, round(8 * scale))


def _line_height(scale: float) -> int:
    """Pixel distance between banner baselines (glyph height, descent and a gap)."""
    (_, text_h), descent = cv2.getTextSize("Ag", _FONT, scale, _thickness(scale))
    return text_h + descent + _padding(scale) // 2


def _wrap_banner(text: str, width: int, height: int, scale: float) -> list[str]:
    """Greedily word-wrap ``text`` to ``width`` px.

    At most 4 lines and at most half the image height (but always one line);
    if cut, the last line ends in "...". Words wider than a line are split.
    """
    avail = max(1, width - 2 * _padding(scale))
    max_lines = max(1, min(_BANNER_MAX_LINES, (height // 2) // _line_height(scale)))
    # More characters than the banner can show even in the narrowest glyph:
    # bounds the measuring work for very long answers without changing output.
    narrowest = min(_text_width(c, scale) for c in " .,:;'!|il")
    text = _drawable(text[: (max_lines + 1) * (avail // max(1, narrowest) + 1)])
    lines: list[str] = []
    current = ""
    for word in text.split():
        # One line more than fits is enough to know the text must be cut.
        if len(lines) > max_lines:
            break
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, scale) <= avail:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _text_width(word, scale) > avail and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and _text_width(word[:cut], scale) > avail:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(last + "...", scale) > avail:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _banner_height(lines: list[str], scale: float) -> int:
    """Height of the banner band holding ``lines`` (0 when there is no text)."""
    return len(lines) * _line_height(scale) + _padding(scale) if lines else 0


def _draw_banner(canvas: np.ndarray, lines: list[str], scale: float, banner_h: int) -> None:
    """Darken the top ``banner_h`` rows (black at alpha 0.65) and write ``lines`` in white."""
    band = canvas[:banner_h]
    band[:] = (band.astype(np.float32) * 0.35).astype(np.uint8)
    pad, step = _padding(scale), _line_height(scale)
    (_, text_h), _ = cv2.getTextSize("Ag", _FONT, scale, _thickness(scale))
    for k, line in enumerate(lines):
        baseline = pad + k * step + text_h
        cv2.putText(canvas, line, (pad, baseline), _FONT, scale, (255, 255, 255),
                    _thickness(scale), cv2.LINE_AA)


def _draw_label(canvas: np.ndarray, text: str, x: int, y: int,
                color: tuple[int, int, int], scale: float) -> None:
    """Draw ``text`` on a filled ``color`` tag whose top-left is at ``(x, y)``."""
    scale = max(0.35, scale)
    thick = max(1, round(scale * 1.4))
    (tw, th), descent = cv2.getTextSize(text, _FONT, scale, thick)
    pad = max(1, round(3 * scale))
    h, w = canvas.shape[:2]
    # Shift the tag inside the image rather than letting the edges clip it.
    x = min(max(0, x), max(0, w - tw - 2 * pad))
    y = min(max(0, y), max(0, h - th - descent - 2 * pad))
    cv2.rectangle(canvas, (x, y), (x + tw + 2 * pad, y + th + descent + 2 * pad), color, -1)
    # Black on light tags, white on dark ones (ITU-R BT.601 luma).
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luma > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (x + pad, y + pad + th), _FONT, scale, ink, thick, cv2.LINE_AA)
