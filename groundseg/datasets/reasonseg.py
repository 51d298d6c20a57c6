"""ReasonSeg (LISA's reasoning-segmentation benchmark): one image and one JSON file of the same name per sample.

Layout (LISA's README; ``--data-root`` may be any of the three levels)::

    <root>/reason_seg/ReasonSeg/{train,val,test}/<name>.jpg + <name>.json

The JSON (a labelme file with two extra keys)::

    {"text": [str, ...] | str, "is_sentence": bool,
     "shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y], ...], ...}, ...],
     "imageHeight": int, "imageWidth": int, ...}

``text`` holds the instructions (several rephrasings in train; the evaluation uses the first); ``is_sentence`` tells a
long (sentence) query from a short (phrase) one. The ground truth is rasterised as LISA's
``utils/data_processing.py`` does: "flag" shapes are skipped; the polygons, with their vertices cast to int32, are
drawn in order of decreasing filled area, each outlined (1 px) and filled, with 1 for a target and 255 for a label
containing "ignore", so a smaller polygon drawn later wins where they overlap. 255 pixels count in neither
intersection nor union in the metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from groundseg.io import InputError

__all__ = ["ReasonSegSample", "find_split_folder", "load_reasonseg", "reasonseg_mask", "SHORT_QUESTION",
           "LONG_QUESTION"]

PathLike = Union[str, os.PathLike]

#: LISA's evaluation questions: short queries (phrases) and long ones (sentences, ``is_sentence``).
SHORT_QUESTION = "What is {} in this image? Please output segmentation mask."
LONG_QUESTION = "{} Please output segmentation mask."

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ReasonSegSample:
    """One image of a ReasonSeg split: its files, instructions, query kind and size."""

    name: str
    image: Path
    json_path: Path
    texts: tuple[str, ...]
    is_sentence: bool
    height: int
    width: int
    shapes: tuple[dict, ...]

    @property
    def kind(self) -> str:
        """``"long"`` for a sentence query, ``"short"`` for a phrase (the test split's two halves)."""
        return "long" if self.is_sentence else "short"

    @property
    def question(self) -> str:
        return LONG_QUESTION if self.is_sentence else SHORT_QUESTION

    def mask(self) -> np.ndarray:
        """``(H, W)`` uint8 ground truth: 1 target, 255 ignore, 0 background."""
        return reasonseg_mask(self.shapes, self.height, self.width, str(self.json_path))


def find_split_folder(data_root: PathLike, split: str) -> Path:
    """``<root>/reason_seg/ReasonSeg/<split>``, ``<root>/ReasonSeg/<split>`` or ``<root>/<split>``, first found."""
    root = Path(data_root)
    for folder in (root / "reason_seg" / "ReasonSeg" / split, root / "ReasonSeg" / split, root / split):
        if folder.is_dir():
            return folder
    raise InputError(f"ReasonSeg split {split!r} not found under {root} (looked for reason_seg/ReasonSeg/{split}, "
                     f"ReasonSeg/{split} and {split})")


def _read_annotation(path: Path) -> dict:
    """The JSON, as UTF-8 or (like LISA, for a few files) cp1252."""
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            data = json.loads(raw.decode(encoding))
            break
        except UnicodeDecodeError:
            continue
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc})") from None
    else:
        raise InputError(f"{path} is neither UTF-8 nor cp1252 text")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with text, is_sentence and shapes")
    missing = [k for k in ("text", "is_sentence", "shapes") if k not in data]
    if missing:
        raise InputError(f"{path}: missing keys {missing}")
    if not isinstance(data["shapes"], list) or not all(isinstance(s, dict) and "points" in s and "label" in s
                                                       for s in data["shapes"]):
        raise InputError(f"{path}: 'shapes' must be a list of {{label, points}} objects")
    return data


def _image_size(image: Path, ann: dict) -> tuple[int, int]:
    if isinstance(ann.get("imageHeight"), int) and isinstance(ann.get("imageWidth"), int):
        return ann["imageHeight"], ann["imageWidth"]
    from PIL import Image

    try:
        with Image.open(image) as im:
            w, h = im.size
    except OSError as exc:
        raise InputError(f"{image}: cannot read the image size ({exc})") from None
    return h, w


def load_reasonseg(data_root: PathLike, split: str = "val") -> list[ReasonSegSample]:
    """Every sample of a split, sorted by file name.

    Raises:
        InputError: the split folder is missing or empty, a JSON has no image beside it, or is malformed.
    """
    folder = find_split_folder(data_root, split)
    samples = []
    for json_path in sorted(folder.glob("*.json")):
        image = next((json_path.with_suffix(s) for s in IMAGE_SUFFIXES if json_path.with_suffix(s).is_file()), None)
        if image is None:
            raise InputError(f"{json_path}: no image beside it ({', '.join(IMAGE_SUFFIXES)})")
        ann = _read_annotation(json_path)
        texts = ann["text"] if isinstance(ann["text"], list) else [ann["text"]]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InputError(f"{json_path}: 'text' must be a non-empty string or list of strings")
        h, w = _image_size(image, ann)
        samples.append(ReasonSegSample(name=json_path.stem, image=image, json_path=json_path,
                                       texts=tuple(t.strip() for t in texts), is_sentence=bool(ann["is_sentence"]),
                                       height=h, width=w, shapes=tuple(ann["shapes"])))
    if not samples:
        raise InputError(f"{folder}: no ReasonSeg annotations (*.json)")
    return samples


def _polygon(points: Any, where: str) -> np.ndarray:
    try:
        poly = np.array(points, dtype=np.float64)
    except (TypeError, ValueError):
        poly = np.zeros((0,))
    if poly.ndim != 2 or poly.shape[1] != 2 or not np.isfinite(poly).all():
        raise InputError(f"{where}: polygon points must be [[x, y], ...]")
    return poly.astype(np.int32)[None]  # truncation toward zero, as np.array(..., dtype=np.int32) in LISA


def _draw(canvas: np.ndarray, poly: np.ndarray, value: int) -> None:
    cv2.polylines(canvas, poly, True, value, 1)
    cv2.fillPoly(canvas, poly, value)


def reasonseg_mask(shapes: list[dict] | tuple[dict, ...], height: int, width: int, where: str = "ReasonSeg"
                   ) -> np.ndarray:
    """Rasterise labelme ``shapes`` to an ``(height, width)`` uint8 mask: 1 target, 255 ignore (module docstring)."""
    drawn = []
    for k, shape in enumerate(shapes):
        label = str(shape["label"]).lower()
        if label == "flag":
            continue
        poly = _polygon(shape["points"], f"{where} shape {k}")
        probe = np.zeros((height, width), np.uint8)
        _draw(probe, poly, 1)
        drawn.append((int(probe.sum()), k, poly, 255 if "ignore" in label else 1))
    # Decreasing area; equal areas keep the reverse of file order, as numpy's argsort()[::-1] does.
    order = sorted(range(len(drawn)), key=lambda i: (drawn[i][0], i))[::-1]
    mask = np.zeros((height, width), np.uint8)
    for i in order:
        _draw(mask, drawn[i][2], drawn[i][3])
    return mask
