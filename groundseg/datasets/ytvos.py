"""Ref-YouTube-VOS-format referring video datasets (Ref-YouTube-VOS train layout, and the shapes world's videos).

Layout under ``root``::

    JPEGImages/<video>/<frame>.jpg
    Annotations/<video>/<frame>.png    palette PNG: pixel value = object id, 0 = background
    meta_expressions.json              {"videos": {video: {"expressions": {"0": {"exp": str, "obj_id": "1"}},
                                                           "frames": ["00000", ...]}}}
    meta.json                          optional: {"videos": {video: {"objects": {"1": {"category": str,
                                                                                    "frames": [...]}}}}}

``obj_id`` is absent from the expressions of the official valid/test splits (no masks there), so it is optional
here; the shapes world adds ``"kind"`` (``"motion"``/``"attribute"``) to each expression.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from groundseg.io import InputError, read_json

__all__ = ["VideoExpression", "YTVOSVideo", "YTVOS", "load_ytvos"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class VideoExpression:
    """One referring expression: ``exp_id`` is its key in meta_expressions.json, ``obj_id`` the annotated object
    (None where the split has no masks), ``kind`` the expression kind where recorded."""

    exp_id: str
    text: str
    obj_id: int | None
    kind: str | None


@dataclass
class YTVOSVideo:
    """One video: frame names in order, their JPEG and annotation PNG paths, expressions, and the objects from
    meta.json (``obj_id -> {"category": str, "frames": [frame names where annotated]}``; empty without meta.json)."""

    name: str
    frames: list[str]
    frame_paths: list[Path]
    mask_paths: list[Path]
    expressions: list[VideoExpression]
    objects: dict[int, dict] = field(default_factory=dict)


class YTVOS:
    """An indexed Ref-YouTube-VOS dataset (see :func:`load_ytvos`); ``videos`` maps name -> :class:`YTVOSVideo`."""

    def __init__(self, root: Path, videos: dict[str, YTVOSVideo]) -> None:
        self.root = root
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[YTVOSVideo]:
        return iter(self.videos.values())

    def __getitem__(self, name: str) -> YTVOSVideo:
        return self.videos[name]

    def expressions(self) -> Iterator[tuple[YTVOSVideo, VideoExpression]]:
        """Every (video, expression) pair, video by video."""
        for video in self.videos.values():
            for exp in video.expressions:
                yield video, exp

    def masks(self, video: Union[str, YTVOSVideo], obj_id: int) -> Iterator[np.ndarray]:
        """Stream the ``(H, W)`` bool mask of ``obj_id`` frame by frame (one PNG open at a time).

        Raises:
            InputError: an annotation PNG is missing, unreadable, or not single-channel (palette or grey).
        """
        if isinstance(video, str):
            video = self.videos[video]
        for path in video.mask_paths:
            yield _read_label_png(path) == int(obj_id)


def _read_label_png(path: Path) -> np.ndarray:
    """``(H, W)`` integer labels of a palette (``P``) or greyscale (``L``) annotation PNG."""
    if not path.is_file():
        raise InputError(f"annotation not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise InputError(f"{path}: annotation must be a palette or greyscale PNG, got mode {img.mode}")
            # np.asarray of a "P" image gives palette indices, which are the object ids.
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"{path} is not a readable PNG ({exc})") from exc




def load_ytvos(root: PathLike, meta_expressions: PathLike | None = None) -> YTVOS:
    """Load a Ref-YouTube-VOS-layout dataset.

    Args:
        root: folder holding ``JPEGImages/``, ``Annotations/``, ``meta_expressions.json`` and optionally
            ``meta.json``.
        meta_expressions: path of the expressions file when it lives elsewhere (the official release keeps it in
            ``meta_expressions/<split>/meta_expressions.json``).

    Raises:
        InputError: the folder or expressions file is missing or malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Ref-YouTube-VOS folder not found: {root}")
    exp_path = Path(meta_expressions) if meta_expressions is not None else root / "meta_expressions.json"
    if not exp_path.is_file():
        raise InputError(f"expressions file not found: {exp_path}")
    data = read_json(exp_path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        raise InputError(f"{exp_path} must hold {{'videos': {{video: {{'expressions': ..., 'frames': ...}}}}}}")
    meta_path = root / "meta.json"
    meta = read_json(meta_path).get("videos", {}) if meta_path.is_file() else {}

    videos = {}
    for name, entry in data["videos"].items():
        frames = [str(f) for f in entry.get("frames", [])]
        expressions = []
        for exp_id, e in entry.get("expressions", {}).items():
            if "exp" not in e:
                raise InputError(f"{exp_path}: expression {exp_id} of video {name} has no 'exp'")
            obj = e.get("obj_id")
            expressions.append(VideoExpression(exp_id=str(exp_id), text=e["exp"],
                                               obj_id=int(obj) if obj is not None else None, kind=e.get("kind")))
        objects = {int(k): v for k, v in meta.get(name, {}).get("objects", {}).items()}
        videos[name] = YTVOSVideo(
            name=name,
            frames=frames,
            frame_paths=[root / "JPEGImages" / name / f"{f}.jpg" for f in frames],
            mask_paths=[root / "Annotations" / name / f"{f}.png" for f in frames],
            expressions=expressions,
            objects=objects,
        )
    return YTVOS(root, videos)
