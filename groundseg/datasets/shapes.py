"""A procedural "shapes world": images and videos of coloured shapes with exact masks and unambiguous language.

Every sample is drawn from its own random generator, so a dataset of any size is random-access and
deterministic without storing anything:

* image ``i`` of seed ``s`` uses ``np.random.default_rng([s, i])``;
* video ``i`` of seed ``s`` uses ``np.random.default_rng([s, i, 1])`` (a different stream from image ``i``).

An image holds 1-8 objects (6 shapes x 6 colours x 2 sizes) on a greyish gradient background with mild noise. Objects
have a depth order (object ``k`` is drawn on top of objects ``< k``); an object's mask is what remains *visible*, so
masks of one image are disjoint, and layouts where an object keeps less than 60% of its area are rejected. Shapes are
filled without antialiasing (``cv2.LINE_8``), so a mask is exactly the set of pixels painted in the object's colour.

Language comes with every image, each expression checked to refer to exactly its targets:

* referring expressions of five kinds (:data:`EXPRESSION_KINDS`): attribute ("the red circle"), relational ("the
  square left of the green star"), ordinal ("the second triangle from the left", "the largest shape"), reasoning
  ("the shape with three corners") and multi ("all the blue shapes", several targets);
* a GLaMM-style grounded caption (``<p>a red circle</p> [SEG] ...``), region questions (``What is in <bbox>?``) and
  Qwen-VL-style box answers (``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``).

:func:`write_shapes` writes a dataset to disk in the real formats (PNG images, COCO ``instances.json``, REFER
``refs(unc).p``, a grounded-text JSON, and Ref-YouTube-VOS folders for videos), so the ordinary loaders read it.

Coordinates: pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``; centers are continuous in that frame and
boxes are ``xyxy`` with exclusive ``x2``/``y2`` (as :func:`groundseg.io.mask_to_bbox`).
"""

from __future__ import annotations

import math
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import cv2
import numpy as np
from PIL import Image

from groundseg.grounding.tokens import BBOX, P_END, P_START, SEG, format_ref_box
from groundseg.io import atomic_write, mask_to_bbox, mask_to_rle, masks_to_boxes_xyxy, save_jpeg, save_json

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "EXPRESSION_KINDS",
    "ShapeObject",
    "Expression",
    "RegionQuestion",
    "BoxAnswer",
    "ShapesImage",
    "VideoObject",
    "ShapesVideo",
    "ShapesWorld",
    "write_shapes",
    "ann_id_for",
    "image_id_for",
    "listing_key",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")
"""Shape names; COCO category id of ``SHAPES[i]`` is ``i + 1``."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
"""Base RGB of each colour word. Objects get a per-channel jitter of at most ±10 (plus ±5 pixel noise), far less
than half the distance between any two of these, so the colour word of every pixel is its nearest base colour."""

SIZES: dict[str, float] = {"small": 0.07, "large": 0.125}
"""Equal-area radius of each size as a fraction of ``min(H, W)``: every shape of a size has the area of a circle of
this radius (so "large" always means about 3.2x the area of "small", whatever the shape)."""

EXPRESSION_KINDS: tuple[str, ...] = ("attribute", "relational", "ordinal", "reasoning", "multi")
"""Kinds of image expressions; videos use ``"attribute"`` and ``"motion"``."""

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "hexagon": "hexagons", "diamond": "diamonds", "shape": "shapes"}


def _regular(n: int, start_deg: float) -> np.ndarray:
    a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


# Unit outlines (circumradius 1, image axes: y points down), at angle 0.
_OUTLINES: dict[str, np.ndarray] = {
    "square": _regular(4, 45.0),
    "triangle": _regular(3, -90.0),  # apex up
    "hexagon": _regular(6, 0.0),
    "star": _star(),
    # A rhombus, not a rotated square: its diagonals differ, so it never looks like a "square".
    "diamond": np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]]),
}


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# Circumradius per unit equal-area radius: sqrt(pi / area of the unit outline).
_CIRCUMRADIUS = {"circle": 1.0, **{s: math.sqrt(math.pi / _polygon_area(p)) for s, p in _OUTLINES.items()}}

# Rotation ranges in degrees. Squares and diamonds stay near upright so that neither reads as the other; the
# others have rotational symmetry, so one period covers every look.
_ANGLES = {"circle": (0.0, 0.0), "square": (-20.0, 20.0), "diamond": (-15.0, 15.0), "triangle": (0.0, 120.0),
           "star": (0.0, 72.0), "hexagon": (0.0, 60.0)}

_MIN_VISIBLE = 0.6  # fraction of its full area every object keeps visible (occlusion + image border)
_PLACEMENT_TRIES = 25
_REL_MARGIN = 0.10  # "left of" etc.: center offset along the axis > this x min(H, W) ...
_REL_UNCLEAR = 0.03  # ... and every other candidate's offset <= this x min(H, W) (clearly not satisfying)
_ORD_MARGIN = 0.08  # ordinal: neighbours in the ordering at least this x min(H, W) apart
_AREA_RATIO = 1.5  # size superlatives: largest >= 1.5 x the runner-up (visible areas)
_MOVE_FRACTION = 0.8  # "moving right": >= 80% of frame steps go mostly right; others must be <= 20%

_REASONING_SHAPE = {
    "triangle": ("the shape with three corners", "the shape with three sides"),
    "square": ("the shape with four right angles",),
    "hexagon": ("the shape with six corners", "the shape shaped like a honeycomb cell"),
    "star": ("the shape with five points",),
    "circle": ("the round shape", "the shape with no corners"),
    "diamond": ("the shape like the diamond suit on playing cards",),
}
_REASONING_COLOR = {
    "green": ("something the colour of grass", "the shape the colour of a leaf"),
    "blue": ("something the colour of the sky", "the shape the colour of the sea"),
    "yellow": ("something the colour of a banana", "the shape the colour of a lemon"),
    "red": ("something the colour of blood", "the shape the colour of a strawberry"),
    "orange": ("something the colour of an orange", "the shape the colour of a carrot"),
    "purple": ("something the colour of lavender", "the shape the colour of grapes"),
}

# Descriptors: which attributes a noun phrase names, shortest (then most natural) first.
_Descriptor = tuple[str, ...]
_DESCRIPTORS: tuple[_Descriptor, ...] = (
    (), ("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"), ("size", "color"),
    ("size", "color", "shape"),
)
_FULL: _Descriptor = ("size", "color", "shape")


# --------------------------------------------------------------------------- #
# Data types
# --------------------------------------------------------------------------- #


@dataclass
class ShapeObject:
    """One object of a :class:`ShapesImage`.

    Attributes:
        id: 1-based within the image; also its depth (higher ids are drawn on top) and its label-map value.
        shape, color, size: words from :data:`SHAPES`, :data:`COLORS`, :data:`SIZES`.
        center: ``(x, y)`` of the full (unoccluded) shape, continuous pixels.
        radius: circumradius in pixels (center to farthest vertex).
        angle: rotation in degrees, clockwise on screen (0 for circles).
        mask: ``(H, W)`` bool, the visible pixels.
        box: ``(x1, y1, x2, y2)`` float pixels of ``mask`` (exclusive ``x2``/``y2``).
        area: visible pixel count (``mask.sum()``).
        rgb: the fill colour actually used (base colour + jitter).
    """

    id: int
    shape: str
    color: str
    size: str
    center: tuple[float, float]
    radius: float
    angle: float
    mask: np.ndarray
    box: tuple[float, float, float, float]
    area: int
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Expression:
    """A referring expression and the object ids it refers to.

    ``kind`` is one of :data:`EXPRESSION_KINDS` (images) or ``"attribute"``/``"motion"`` (videos); ``targets`` has
    exactly one id, except for ``"multi"``, which has two or more sorted left to right by center x.
    """

    text: str
    kind: str
    targets: list[int]


@dataclass
class RegionQuestion:
    """A GLaMM-style region question: ``box`` is the target's visible box (xyxy pixels), ``question`` contains one
    ``<bbox>`` token standing for it, ``answer`` describes the object."""

    box: tuple[float, float, float, float]
    question: str
    answer: str
    target: int


@dataclass
class BoxAnswer:
    """A Qwen-VL-style grounding pair: ``answer`` is ``<ref>expr</ref><box>(x1,y1),(x2,y2)</box>`` on the 0-1000 grid
    (:func:`groundseg.grounding.tokens.format_ref_box`) of the target's visible box."""

    question: str
    answer: str
    target: int


@dataclass
class ShapesImage:
    """One generated image with its annotations.

    Attributes:
        index: position in the world (``image_id = index + 1`` on disk).
        file_name: ``shapes_{index:06d}.png``.
        image: ``(H, W, 3)`` uint8 RGB.
        objects: in depth order (``objects[k].id == k + 1``).
        expressions: referring expressions (see :class:`Expression`).
        caption: grounded caption, one ``<p>phrase</p> [SEG]`` per object in :func:`listing_key` order (colour,
            shape, size, then left to right), without final punctuation:
            ``There are <p>a red circle</p> [SEG], ... and <p>a small blue star</p> [SEG]``
            (``There is <p>...</p> [SEG]`` for a single object).
        caption_targets: object id of each ``[SEG]`` of ``caption``, in order.
        region_questions, box_answers: see :class:`RegionQuestion`, :class:`BoxAnswer`.
    """

    index: int
    file_name: str
    image: np.ndarray
    objects: list[ShapeObject]
    expressions: list[Expression]
    caption: str
    caption_targets: list[int]
    region_questions: list[RegionQuestion]
    box_answers: list[BoxAnswer]

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass
class VideoObject:
    """Static attributes and trajectory of one moving object of a :class:`ShapesVideo`.

    Attributes:
        id, shape, color, size, radius, angle: as in :class:`ShapeObject`.
        centers: ``(T, 2)`` float ``(x, y)`` per frame (may lie outside the image while the object is out of frame).
        steps: ``(T - 1, 2)`` float displacement of each frame step (a wrap-around counts as the velocity, not the
            jump).
        direction: ``"left"``/``"right"``/``"up"``/``"down"`` when at least 80% of the steps go mostly that way,
            else ``None``.
        wraps: whether the object leaves the frame on one side and comes back on the opposite side.
    """

    id: int
    shape: str
    color: str
    size: str
    radius: float
    angle: float
    centers: np.ndarray
    steps: np.ndarray
    direction: str | None
    wraps: bool = False
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class ShapesVideo:
    """One generated video.

    Attributes:
        index: position in the world.
        name: video id on disk, ``shapes_v{index:06d}``.
        frames: ``T`` arrays ``(H, W, 3)`` uint8 RGB.
        masks: object id -> ``(T, H, W)`` bool visible masks (all False in frames where it is out of frame or hidden).
        objects: in depth order (``objects[k].id == k + 1``).
        expressions: kinds ``"motion"`` and ``"attribute"``, one target each.
        reentering: ids of objects whose mask is empty for at least one frame between visible frames (out of
            frame, or fully hidden behind another object); a wrapping object (``wraps``) is always among them.
    """

    index: int
    name: str
    frames: list[np.ndarray]
    masks: dict[int, np.ndarray]
    objects: list[VideoObject]
    expressions: list[Expression]
    reentering: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #


def _rasterize(shape: str, cx: float, cy: float, radius: float, angle: float) -> tuple[np.ndarray, int, int]:
    """Full, unclipped mask of one shape as a patch.

    Returns:
        ``(patch, x0, y0)``: ``patch`` is ``(P, P)`` uint8 0/1 whose pixel ``[0, 0]`` is image pixel ``(x0, y0)``.
    """
    # Two pixels of margin, so that the halo dilation of the shape still fits in the patch.
    x0 = math.floor(cx - radius) - 2
    y0 = math.floor(cy - radius) - 2
    side = math.ceil(2 * radius) + 5
    patch = np.zeros((side, side), np.uint8)
    # OpenCV puts pixel centers at integer coordinates, we at +0.5; 4 fractional bits keep sub-pixel positions.
    px, py = cx - 0.5 - x0, cy - 0.5 - y0
    if shape == "circle":
        # cv2 fills every pixel whose center is within radius + ~0.5; shrink so the area matches pi r^2.
        r = max(radius - 0.5, 0.5)
        cv2.circle(patch, (round(px * 16), round(py * 16)), round(r * 16), 1, -1, cv2.LINE_8, 4)
    else:
        a = math.radians(angle)
        c, s = math.cos(a), math.sin(a)
        rot = _OUTLINES[shape] @ np.array([[c, s], [-s, c]])
        pts = np.rint((rot * radius + (px, py)) * 16).astype(np.int32)
        cv2.fillPoly(patch, [pts], 1, cv2.LINE_8, 4)
    return patch, x0, y0


def _clip(patch: np.ndarray, x0: int, y0: int, h: int, w: int) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """The part of ``patch`` inside an ``(h, w)`` image as bool and the image slices it covers, or None if none is."""
    side = patch.shape[0]
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, h), max(x0, 0), min(x0 + side, w)
    if ya >= yb or xa >= xb:
        return None
    return patch[ya - y0:yb - y0, xa - x0:xb - x0].astype(bool), (slice(ya, yb), slice(xa, xb))


# Same-coloured objects keep >= 2 background pixels between them (a 5x5 dilation must not touch).
_HALO_KERNEL = np.ones((5, 5), np.uint8)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth two-colour gradient of desaturated greys plus soft blotches, ``(H, W, 3)`` float32.

    Greys keep every object colour far from the background in hue, so colour words stay unambiguous.
    """
    gray = rng.uniform(70.0, 190.0, size=2)
    tint = rng.uniform(-12.0, 12.0, size=(2, 3))
    c1, c2 = (gray[:, None] + tint).astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    cos, sin = math.cos(theta), math.sin(theta)
    xs = ((np.arange(w, dtype=np.float32) + 0.5) / w - 0.5) * cos
    ys = ((np.arange(h, dtype=np.float32) + 0.5) / h - 0.5) * sin
    t = (xs[None, :] + ys[:, None]) / (abs(cos) + abs(sin)) + 0.5  # (H, W) in [0, 1]
    blotches = cv2.resize(rng.normal(0.0, 7.0, size=(6, 6)).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC)
    return c1 + (c2 - c1) * t[:, :, None] + blotches[:, :, None]


def _compose(background: np.ndarray, labels: np.ndarray, rgbs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint object colours over the background by label and add grey pixel noise.

    Args:
        background: ``(H, W, 3)`` float32.
        labels: ``(H, W)`` uint8, 0 = background, k = object k.
        rgbs: ``(K + 1, 3)`` fill colour per label (row 0 unused).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    canvas = background.copy()
    fg = labels > 0
    canvas[fg] = rgbs[labels[fg]]
    noise = rng.integers(-5, 6, size=labels.shape, dtype=np.int16).astype(np.float32)
    canvas += noise[:, :, None]  # the same for all channels: noise adds no colour
    return np.clip(canvas, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- #
# Language
# --------------------------------------------------------------------------- #


def _noun(obj, keys: _Descriptor) -> str:
    """Noun phrase without article naming the attributes ``keys`` of ``obj``: "small red circle", "red shape"."""
    words = [obj.size] if "size" in keys else []
    if "color" in keys:
        words.append(obj.color)
    words.append(obj.shape if "shape" in keys else "shape")
    return " ".join(words)


def _plural(obj, keys: _Descriptor) -> str:
    words = _noun(obj, keys).split()
    words[-1] = _PLURAL[words[-1]]
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _bit(i: int) -> int:
    return 1 << i


class _Scene:
    """Bitmask index of a scene's attributes: ``match[i][d]`` = set of objects that share object ``i``'s values of
    descriptor ``d`` (bit ``j`` = object ``j``), so uniqueness checks are integer comparisons."""

    def __init__(self, objs: Sequence) -> None:
        self.objs = objs
        self.n = len(objs)
        self.match: list[dict[_Descriptor, int]] = []
        for o in objs:
            row = {}
            for d in _DESCRIPTORS:
                m = 0
                for j, p in enumerate(objs):
                    if all(getattr(p, k) == getattr(o, k) for k in d):
                        m |= _bit(j)
                row[d] = m
            self.match.append(row)
        # Shortest descriptor that singles each object out (None for exact duplicates).
        self.unique: list[list[_Descriptor]] = [
            [d for d in _DESCRIPTORS if self.match[i][d] == _bit(i)] for i in range(self.n)
        ]

    def name(self, i: int) -> str | None:
        """Shortest unique definite description of object ``i`` ("the red circle"), or None."""
        u = self.unique[i]
        return "the " + _noun(self.objs[i], u[0]) if u else None

    def members(self, mask: int) -> list[int]:
        return [j for j in range(self.n) if mask >> j & 1]


def _attribute_expressions(scene: _Scene, rng: np.random.Generator) -> list[Expression]:
    """The shortest unique description of every object that has one, and sometimes a longer unique variant."""
    out = []
    for i, o in enumerate(scene.objs):
        u = scene.unique[i]
        if not u:
            continue  # an exact duplicate: only relational/ordinal expressions can single it out
        out.append(Expression("the " + _noun(o, u[0]), "attribute", [o.id]))
        longer = [d for d in u if len(d) > len(u[0])]
        if longer and rng.random() < 0.5:
            out.append(Expression("the " + _noun(o, longer[rng.integers(len(longer))]), "attribute", [o.id]))
    return out


def _relational_expressions(scene: _Scene, s: float, rng: np.random.Generator, limit: int) -> list[Expression]:
    """"the square left of the green star": the anchor is uniquely named; among objects matching the target's phrase,
    only the target clearly satisfies the relation and none is borderline."""
    n = scene.n
    if n < 2:
        return []
    cx = np.array([o.center[0] for o in scene.objs])
    cy = np.array([o.center[1] for o in scene.objs])
    # offset[rel][t, a] > 0 when object t is <rel> anchor a.
    offsets = {
        "left of": cx[None, :] - cx[:, None],
        "right of": cx[:, None] - cx[None, :],
        "above": cy[None, :] - cy[:, None],
        "below": cy[:, None] - cy[None, :],
    }
    target_descriptors = (("shape",), ("color",), (), ("color", "shape"), ("size", "shape"), ("size",))
    preferred, fallback = [], []
    for rel, off in offsets.items():
        sat = [sum(_bit(t) for t in range(n) if off[t, a] > _REL_MARGIN * s) for a in range(n)]
        unclear = [sum(_bit(t) for t in range(n) if _REL_UNCLEAR * s < off[t, a] <= _REL_MARGIN * s)
                   for a in range(n)]
        for a in range(n):
            anchor = scene.name(a)
            if anchor is None:
                continue
            for t in scene.members(sat[a]):
                for d in target_descriptors:
                    cand = scene.match[t][d] & ~_bit(a)
                    if cand & sat[a] == _bit(t) and cand & unclear[a] == 0:
                        text = f"the {_noun(scene.objs[t], d)} {rel} {anchor}"
                        # Relations that are needed (the phrase alone is ambiguous) teach more.
                        (fallback if scene.match[t][d] == _bit(t) else preferred).append(
                            Expression(text, "relational", [scene.objs[t].id]))
                        break
    return _pick(preferred, rng, limit) + _pick(fallback, rng, max(0, limit - len(preferred)))


def _ordinal_expressions(scene: _Scene, s: float, rng: np.random.Generator, limit: int) -> list[Expression]:
    """Positions ("the leftmost circle", "the second red shape from the top") and size superlatives ("the largest
    shape"), within a group of >= 2 objects sharing a descriptor, with clear gaps to the neighbours in the order."""
    if scene.n < 2:
        return []
    out: list[Expression] = []
    seen_groups: set[int] = set()
    for i in range(scene.n):
        for d in ((), ("shape",), ("color",), ("color", "shape"), ("size",)):
            group = scene.match[i][d]
            if group in seen_groups or bin(group).count("1") < 2:
                continue
            seen_groups.add(group)
            members = scene.members(group)
            noun = _noun(scene.objs[i], d)
            for axis, (first, last) in ((0, ("left", "right")), (1, ("top", "bottom"))):
                order = sorted(members, key=lambda j: scene.objs[j].center[axis])
                pos = [scene.objs[j].center[axis] for j in order]
                for from_end, side in ((False, first), (True, last)):
                    seq = order[::-1] if from_end else order
                    p = pos[::-1] if from_end else pos
                    for k in range(min(3, len(seq))):
                        gaps = [abs(p[k] - p[k - 1])] if k > 0 else []
                        if k + 1 < len(seq):
                            gaps.append(abs(p[k + 1] - p[k]))
                        if min(gaps) < _ORD_MARGIN * s:
                            continue
                        if k == 0:
                            text = f"the {side}most {noun}"
                        else:
                            text = f"the {('second', 'third')[k - 1]} {noun} from the {side}"
                        out.append(Expression(text, "ordinal", [scene.objs[seq[k]].id]))
            if "size" not in d:
                by_area = sorted(members, key=lambda j: scene.objs[j].area)
                areas = [scene.objs[j].area for j in by_area]
                if areas[-1] >= _AREA_RATIO * areas[-2]:
                    out.append(Expression(f"the largest {noun}", "ordinal", [scene.objs[by_area[-1]].id]))
                if areas[1] >= _AREA_RATIO * areas[0]:
                    out.append(Expression(f"the smallest {noun}", "ordinal", [scene.objs[by_area[0]].id]))
    return _pick(out, rng, limit)


def _reasoning_expressions(scene: _Scene, rng: np.random.Generator, limit: int) -> list[Expression]:
    """Descriptions that need world knowledge ("the colour of the sky"), for a shape or colour that is unique."""
    out = []
    for i, o in enumerate(scene.objs):
        for key, table in (("shape", _REASONING_SHAPE), ("color", _REASONING_COLOR)):
            if scene.match[i][(key,)] == _bit(i):
                options = table[getattr(o, key)]
                out.append(Expression(options[rng.integers(len(options))], "reasoning", [o.id]))
    return _pick(out, rng, limit)


def _multi_expressions(scene: _Scene, rng: np.random.Generator, limit: int) -> list[Expression]:
    """"all the blue shapes", "every small shape", "both circles": every object sharing a descriptor (>= 2)."""
    out = []
    seen: set[str] = set()
    for i, o in enumerate(scene.objs):
        for d in (("color",), ("shape",), ("size",), ("color", "shape"), ("size", "shape"), ("size", "color")):
            group = scene.match[i][d]
            count = bin(group).count("1")
            if count < 2:
                continue
            style = rng.integers(3)
            if style == 0 and count == 2:
                text = f"both {_plural(o, d)}"
            elif style == 1:
                text = f"every {_noun(o, d)}"
            else:
                text = f"all the {_plural(o, d)}"
            key = " ".join(text.split()[1:])  # one phrasing per group
            if key in seen:
                continue
            seen.add(key)
            ids = sorted(scene.members(group), key=lambda j: scene.objs[j].center[0])
            out.append(Expression(text, "multi", [scene.objs[j].id for j in ids]))
    return _pick(out, rng, limit)


def _pick(items: list, rng: np.random.Generator, k: int) -> list:
    """Up to ``k`` items in a random order, without duplicate texts."""
    if k <= 0 or not items:
        return []
    out, texts = [], set()
    for j in rng.permutation(len(items)):
        it = items[j]
        if it.text not in texts:
            texts.add(it.text)
            out.append(it)
            if len(out) == k:
                break
    return out


def listing_key(obj: ShapeObject) -> tuple:
    """The order in which grounded captions list objects: by colour (:data:`COLORS` order), then shape
    (:data:`SHAPES` order), then size (small first), then left to right.

    Each phrase's own name then says where the next one is in the list ("after a red star comes the first colour and
    shape after red star that the image has"), which a language model can learn by attending from the last name to
    the image tokens in one step. "Left to right" needs two (find the last-named object, then look right of it);
    the tiny models did not learn it (README, "GCG and region captions"). GCG's metrics do not depend on the order."""
    return (list(COLORS).index(obj.color), SHAPES.index(obj.shape), list(SIZES).index(obj.size), obj.center[0])


def _caption(scene: _Scene) -> tuple[str, list[int]]:
    """Grounded caption listing every object in :func:`listing_key` order, and the object id of each ``[SEG]``."""
    order = sorted(range(scene.n), key=lambda j: listing_key(scene.objs[j]))
    phrases = []
    for j in order:
        o = scene.objs[j]
        # Colour + shape reads naturally; add the size only where that tells the object apart.
        d = ("color", "shape") if scene.match[j][("color", "shape")] == _bit(j) else _FULL
        phrases.append(f"{P_START}{_article(_noun(o, d))}{P_END} {SEG}")
    # No final punctuation: callers put the caption inside their own sentence or answer template.
    if len(phrases) == 1:
        text = f"There is {phrases[0]}"
    else:
        text = "There are " + ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
    return text, [scene.objs[j].id for j in order]


# --------------------------------------------------------------------------- #
# The world
# --------------------------------------------------------------------------- #


class ShapesWorld:
    """Random-access generator of shapes images and videos.

    Args:
        seed: dataset seed; ``(seed, index)`` fully determines a sample.
        image_size: ``S`` for ``S x S`` images, or ``(H, W)``. Sizes and margins scale with ``min(H, W)``.

    Example:
        >>> world = ShapesWorld(seed=0)
        >>> sample = world.image(17)   # the same pixels and annotations on every call and machine
    """

    def __init__(self, seed: int = 0, image_size: Union[int, tuple[int, int]] = 256) -> None:
        if isinstance(image_size, (int, np.integer)):
            image_size = (int(image_size), int(image_size))
        h, w = (int(v) for v in image_size)
        if min(h, w) < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {image_size!r}")
        self.seed = int(seed)
        self.height, self.width = h, w
        self.scale = float(min(h, w))

    # ----------------------------------------------------------------- images

    def image(self, index: int) -> ShapesImage:
        """Generate image ``index`` (any non-negative int) with all its annotations."""
        rng = np.random.default_rng([self.seed, int(index)])
        h, w, s = self.height, self.width, self.scale
        background = _background(rng, h, w)
        labels, specs = self._layout(rng)
        rgbs = np.zeros((len(specs) + 1, 3), np.float32)
        for k, spec in enumerate(specs, start=1):
            rgbs[k] = spec["rgb"]
        pixels = _compose(background, labels, rgbs, rng)

        masks = labels[None, :, :] == np.arange(1, len(specs) + 1, dtype=np.uint8)[:, None, None]  # (N, H, W)
        boxes = masks_to_boxes_xyxy(masks)
        areas = masks.sum(axis=(1, 2))
        objects = [
            ShapeObject(id=k + 1, shape=sp["shape"], color=sp["color"], size=sp["size"], center=sp["center"],
                        radius=sp["radius"], angle=sp["angle"], mask=masks[k],
                        box=tuple(float(v) for v in boxes[k]), area=int(areas[k]), rgb=sp["rgb"])
            for k, sp in enumerate(specs)
        ]

        scene = _Scene(objects)
        expressions = _attribute_expressions(scene, rng)
        expressions += _relational_expressions(scene, s, rng, limit=3)
        expressions += _ordinal_expressions(scene, s, rng, limit=3)
        expressions += _reasoning_expressions(scene, rng, limit=2)
        expressions += _multi_expressions(scene, rng, limit=2)
        caption, caption_targets = _caption(scene)

        by_id = {o.id: o for o in objects}
        region_questions = [
            RegionQuestion(box=o.box, question=f"What is in {BBOX}?", answer=_article(_noun(o, _FULL)), target=o.id)
            for o in objects
        ]
        box_answers = [
            BoxAnswer(question=f"Where is {e.text}?",
                      answer=format_ref_box(e.text, by_id[e.targets[0]].box, (h, w)), target=e.targets[0])
            for e in expressions if len(e.targets) == 1
        ]
        return ShapesImage(index=int(index), file_name=f"shapes_{int(index):06d}.png", image=pixels,
                           objects=objects, expressions=expressions, caption=caption,
                           caption_targets=caption_targets, region_questions=region_questions,
                           box_answers=box_answers)

    def _layout(self, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
        """Place 1-8 objects, each on top of the previous ones, keeping >= 60% of every object visible.

        Returns:
            ``labels`` ``(H, W)`` uint8 (0 background, k = object k visible) and one attribute dict per object.
        """
        h, w, s = self.height, self.width, self.scale
        wanted = int(rng.integers(1, 9))
        # A per-image subset of colours and shapes makes repeats (hence relations, ordinals, groups) common.
        colors = list(COLORS)
        color_pool = rng.choice(len(colors), size=int(rng.integers(2, 7)), replace=False)
        shape_pool = rng.choice(len(SHAPES), size=int(rng.integers(2, 7)), replace=False)
        labels = np.zeros((h, w), np.uint8)
        full_area = [0]  # per label: pixel count of the whole shape, also beyond the image
        visible = [0]  # per label: pixels currently visible
        color_of = np.full(9, -1)  # per label: index into COLORS (-1: background)
        specs: list[dict] = []
        for _ in range(wanted):
            shape = SHAPES[shape_pool[rng.integers(len(shape_pool))]]
            color = colors[color_pool[rng.integers(len(color_pool))]]
            size = "small" if rng.random() < 0.5 else "large"
            radius = SIZES[size] * s * _CIRCUMRADIUS[shape]
            angle = float(rng.uniform(*_ANGLES[shape])) if shape != "circle" else 0.0
            rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], rng.integers(-10, 11, size=3)))
            k = len(specs) + 1
            for _attempt in range(_PLACEMENT_TRIES):
                cx = float(rng.uniform(0.3 * radius, w - 0.3 * radius))
                cy = float(rng.uniform(0.3 * radius, h - 0.3 * radius))
                patch, x0, y0 = _rasterize(shape, cx, cy, radius, angle)
                full = int(patch.sum())
                clipped = _clip(patch, x0, y0, h, w)
                if clipped is None:
                    continue
                inside, region = clipped
                if inside.sum() < _MIN_VISIBLE * full:
                    continue
                under = labels[region][inside]
                covered = np.bincount(under, minlength=k)  # pixels each earlier object would lose
                after = np.asarray(visible) - covered[:k]
                if k > 1 and np.any(after[1:] < _MIN_VISIBLE * np.asarray(full_area[1:])):
                    continue
                # Same-coloured objects that overlap or touch would merge into one blob: no visible boundary.
                halo = _clip(cv2.dilate(patch, _HALO_KERNEL), x0, y0, h, w)[0]
                if k > 1 and np.any(color_of[labels[region][halo]] == colors.index(color)):
                    continue
                labels[region][inside] = k
                color_of[k] = colors.index(color)
                visible = after.tolist() + [int(inside.sum())]
                full_area.append(full)
                specs.append(dict(shape=shape, color=color, size=size, center=(cx, cy), radius=float(radius),
                                  angle=angle, rgb=rgb))
                break
            # An object that fits nowhere is dropped: crowded images just get fewer objects.
        return labels, specs

    # ----------------------------------------------------------------- videos

    def video(self, index: int, num_frames: int = 16) -> ShapesVideo:
        """Generate video ``index``: 2-4 objects moving with constant velocity, bouncing off the walls.

        Two objects are aimed to cross mid-clip (likely occlusion), and in about half the videos (when
        ``num_frames >= 10``) one object leaves through a wall, is out of frame for at least one frame and comes back
        through the opposite wall.
        """
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {num_frames}")
        rng = np.random.default_rng([self.seed, int(index), 1])
        h, w, s = self.height, self.width, self.scale
        t_count = int(num_frames)
        background = _background(rng, h, w)
        n = int(rng.integers(2, 5))
        # Distinct colours: objects cross each other, and same-coloured ones would merge into one blob. Shapes may
        # repeat.
        colors = [list(COLORS)[c] for c in rng.choice(len(COLORS), size=n, replace=False)]
        objs = []
        for k in range(n):
            color, shape = colors[k], SHAPES[rng.integers(len(SHAPES))]
            size = "small" if rng.random() < 0.5 else "large"
            radius = SIZES[size] * s * _CIRCUMRADIUS[shape]
            angle = float(rng.uniform(*_ANGLES[shape])) if shape != "circle" else 0.0
            rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], rng.integers(-10, 11, size=3)))
            # Mostly along one axis (within ±20°), so each object has a clear direction word.
            heading = rng.integers(4) * 90.0 + rng.uniform(-20.0, 20.0)
            speed = rng.uniform(0.015, 0.035) * s
            vel = np.array([math.cos(math.radians(heading)), math.sin(math.radians(heading))]) * speed
            pos = np.array([rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)])
            objs.append(dict(shape=shape, color=color, size=size, radius=radius, angle=angle, rgb=rgb, vel=vel,
                             pos=pos, wrap_axis=None))

        # Aim objects 0 and 1 at a common point at a middle frame (both straight-line paths stay inside, so no bounce
        # can spoil it); keep the random start if no such aim is found.
        tc = int(rng.integers(t_count // 4, max(t_count // 4 + 1, 3 * t_count // 4)))
        for _ in range(20):
            meet = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
            starts = [meet - objs[k]["vel"] * tc for k in (0, 1)]
            if all(self._inside(p, objs[k]["radius"]) for k, p in zip((0, 1), starts)):
                objs[0]["pos"], objs[1]["pos"] = starts
                break

        # One object leaves and re-enters (wraps around): fast along one axis, out of frame around frame 2-5.
        if t_count >= 10 and rng.random() < 0.5:
            o = objs[-1]
            axis = int(rng.integers(2))
            sign = 1.0 if rng.random() < 0.5 else -1.0
            extent = (w, h)[axis]
            speed = rng.uniform(0.05, 0.07) * s
            vel = np.zeros(2)
            vel[axis] = sign * speed
            vel[1 - axis] = rng.uniform(-0.15, 0.15) * speed
            exit_frame = int(rng.integers(2, 6))
            pos = o["pos"].copy()
            # Fully out (center beyond the wall by the circumradius) exactly at exit_frame.
            out_at = extent + o["radius"] if sign > 0 else -o["radius"]
            pos[axis] = out_at - vel[axis] * exit_frame + sign * 1.0
            o.update(vel=vel, pos=pos, wrap_axis=axis)

        centers = np.zeros((n, t_count, 2))
        steps = np.zeros((n, t_count - 1, 2))
        for k, o in enumerate(objs):
            centers[k], steps[k] = self._trajectory(o, t_count)

        video_objects = []
        for k, o in enumerate(objs):
            direction = _direction(steps[k])
            video_objects.append(VideoObject(id=k + 1, shape=o["shape"], color=o["color"], size=o["size"],
                                             radius=float(o["radius"]), angle=o["angle"], centers=centers[k],
                                             steps=steps[k], direction=direction, wraps=o["wrap_axis"] is not None,
                                             rgb=o["rgb"]))

        rgbs = np.zeros((n + 1, 3), np.float32)
        for k, o in enumerate(objs, start=1):
            rgbs[k] = o["rgb"]
        frames, masks = [], np.zeros((n, t_count, h, w), bool)
        for t in range(t_count):
            labels = np.zeros((h, w), np.uint8)
            for k, o in enumerate(video_objects, start=1):  # depth order: later ids on top
                patch, x0, y0 = _rasterize(o.shape, *centers[k - 1, t], o.radius, o.angle)
                clipped = _clip(patch, x0, y0, h, w)
                if clipped is not None:
                    inside, region = clipped
                    labels[region][inside] = k
            frames.append(_compose(background, labels, rgbs, rng))
            for k in range(n):
                masks[k, t] = labels == k + 1

        visible = masks.any(axis=(2, 3))  # (N, T)
        reentering = []
        for k in range(n):
            seen = np.flatnonzero(visible[k])
            if len(seen) and not visible[k, seen[0]:seen[-1] + 1].all():
                reentering.append(k + 1)

        expressions = _attribute_expressions(_Scene(video_objects), rng)
        expressions += _motion_expressions(video_objects)
        return ShapesVideo(index=int(index), name=f"shapes_v{int(index):06d}", frames=frames,
                           masks={k + 1: masks[k] for k in range(n)}, objects=video_objects,
                           expressions=expressions, reentering=reentering)

    def _inside(self, p: np.ndarray, radius: float) -> bool:
        return radius <= p[0] <= self.width - radius and radius <= p[1] <= self.height - radius

    def _trajectory(self, o: dict, t_count: int) -> tuple[np.ndarray, np.ndarray]:
        """Centers ``(T, 2)`` and steps ``(T - 1, 2)``: reflect off the walls, except along a wrap axis, where the
        object re-enters from the other side after being fully out of frame."""
        extent = np.array([self.width, self.height], float)
        r = o["radius"]
        pos, vel = o["pos"].astype(float).copy(), o["vel"].astype(float).copy()
        centers, steps = [pos.copy()], []
        for _ in range(t_count - 1):
            new = pos + vel
            step = vel.copy()
            for axis in range(2):
                if axis == o["wrap_axis"]:
                    # Wrap period = extent + 2r + 2|v|: the object is fully outside (|center - wall| > r) on a band
                    # of length 2|v| around the seam, so at least one frame lands there with an empty mask.
                    lo = -r - abs(vel[axis])
                    period = extent[axis] + 2 * r + 2 * abs(vel[axis])
                    new[axis] = lo + (new[axis] - lo) % period
                    continue
                lo, hi = r, extent[axis] - r
                if hi <= lo:
                    continue
                if new[axis] < lo:
                    new[axis], vel[axis] = 2 * lo - new[axis], -vel[axis]
                elif new[axis] > hi:
                    new[axis], vel[axis] = 2 * hi - new[axis], -vel[axis]
                step[axis] = new[axis] - pos[axis]
            pos = new
            centers.append(pos.copy())
            steps.append(step)
        return np.array(centers), np.array(steps).reshape(-1, 2)


def _step_directions(steps: np.ndarray) -> np.ndarray:
    """Direction word index of each ``(dx, dy)`` step: 0 left, 1 right, 2 up, 3 down (by its larger component)."""
    horizontal = np.abs(steps[:, 0]) >= np.abs(steps[:, 1])
    return np.where(horizontal, np.where(steps[:, 0] < 0, 0, 1), np.where(steps[:, 1] < 0, 2, 3))


_DIRECTIONS = ("left", "right", "up", "down")


def _direction_fractions(steps: np.ndarray) -> np.ndarray:
    """``(4,)`` fraction of steps going mostly left, right, up, down."""
    if len(steps) == 0:
        return np.zeros(4)
    return np.bincount(_step_directions(steps), minlength=4) / len(steps)


def _direction(steps: np.ndarray) -> str | None:
    frac = _direction_fractions(steps)
    best = int(frac.argmax())
    return _DIRECTIONS[best] if frac[best] >= _MOVE_FRACTION else None


def _motion_expressions(objs: list[VideoObject]) -> list[Expression]:
    """"the red square moving up": among objects matching the phrase, only the target moves that way in >= 80% of
    the steps and every other one in <= 20%."""
    scene = _Scene(objs)
    fractions = [_direction_fractions(o.steps) for o in objs]
    out = []
    for i, o in enumerate(objs):
        if o.direction is None:
            continue
        d_idx = _DIRECTIONS.index(o.direction)
        for d in ((), ("shape",), ("color",), ("color", "shape"), ("size", "shape")):
            others = [j for j in scene.members(scene.match[i][d]) if j != i]
            if all(fractions[j][d_idx] <= 1.0 - _MOVE_FRACTION for j in others):
                out.append(Expression(f"the {_noun(o, d)} moving {o.direction}", "motion", [o.id]))
                break
    return out


# --------------------------------------------------------------------------- #
# Writing datasets
# --------------------------------------------------------------------------- #


def image_id_for(index: int) -> int:
    """COCO image id of image ``index`` (1-based, since some tools treat id 0 as missing)."""
    return int(index) + 1


def ann_id_for(index: int, obj_id: int) -> int:
    """COCO annotation id of object ``obj_id`` (1..8) of image ``index``: ``image_id * 100 + obj_id``."""
    return image_id_for(index) * 100 + int(obj_id)


def _split_names(n: int, splits: Sequence[float]) -> list[str]:
    """Split of each image by index: the first ``round(n * train)`` are train, then val, then test."""
    if len(splits) != 3 or any(f < 0 for f in splits) or not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {splits!r}")
    n_train = round(n * splits[0])
    n_val = min(round(n * splits[1]), n - n_train)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)


def _voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC / DAVIS palette (index 0 black, 1 dark red, 2 dark green, ...), flattened RGB."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _save_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    img = Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def write_shapes(
    out_dir: Union[str, os.PathLike],
    seed: int = 0,
    images: int = 100,
    videos: int = 0,
    image_size: Union[int, tuple[int, int]] = 256,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict:
    """Generate a shapes dataset and write it in real on-disk formats.

    Layout (every file written atomically)::

        out_dir/images/shapes_{index:06d}.png     exact pixels of ShapesWorld(seed, image_size).image(index)
        out_dir/shapes/instances.json             COCO: images, annotations (compressed-RLE visible masks),
                                                  categories = SHAPES (id = position + 1)
        out_dir/shapes/refs(unc).p                REFER refs (pickle protocol 2, plain containers only)
        out_dir/shapes/grounded(unc).json         captions, region questions, box answers (format in its "info")
        out_dir/gcg/{split}_gcg_coco_mask_gt.json     GranD-f GCG evaluation files (groundseg eval gcg): COCO
        out_dir/gcg/{split}_gcg_coco_caption_gt.json  masks in caption order, plain captions + phrase labels
        out_dir/gcg/{split}_regcap_coco_caption_gt.json  region captions (groundseg eval regcap), GLaMM's format
        out_dir/videos/JPEGImages/<vid>/00000.jpg   Ref-YouTube-VOS layout, when videos > 0
        out_dir/videos/Annotations/<vid>/00000.png  palette PNG: value = object id, 0 = background
        out_dir/videos/meta_expressions.json
        out_dir/videos/<split>/JPEGImages|Annotations/<vid>/   the same, per split (release layout; hard links)
        out_dir/videos/meta_expressions/<split>/meta_expressions.json
        out_dir/videos/meta.json

    Ids: ``image_id = index + 1``; ``ann_id = image_id * 100 + object id``; ref ids and sentence ids count from 1.
    REFER refs: one ref per single-target object holding all its sentences (``ann_id`` an int), and one
    gRefCOCO-style ref per multi-target expression (``ann_id`` and ``category_id`` lists). Sentences carry an extra
    ``"kind"`` key. The split of a ref is its image's split: the first ``round(images * splits[0])`` indices are
    train, then val, then test.

    Returns:
        A summary dict: counts of images, annotations, refs, sentences, sentences per kind, images per split, videos
        and video expressions, and the paths written.
    """
    out = Path(out_dir)
    image_dir, ann_dir, video_dir = out / "images", out / "shapes", out / "videos"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(seed=seed, image_size=image_size)
    split_of = _split_names(images, splits)

    coco_images, coco_anns, refs, grounded = [], [], [], []
    kinds: Counter = Counter()
    ref_id = sent_id = 0
    for index in range(images):
        sample = world.image(index)
        _save_png(image_dir / sample.file_name, sample.image)
        image_id = image_id_for(index)
        coco_images.append({"id": image_id, "file_name": sample.file_name, "height": sample.height,
                            "width": sample.width})
        category = {}
        for o in sample.objects:
            category[o.id] = SHAPES.index(o.shape) + 1
            coco_anns.append({"id": ann_id_for(index, o.id), "image_id": image_id, "category_id": category[o.id],
                              "bbox": mask_to_bbox(o.mask), "area": o.area, "iscrowd": 0,
                              "segmentation": mask_to_rle(o.mask)})

        # Group sentences by their target set: one ref per object, one per multi-target set.
        groups: dict[tuple[int, ...], list[Expression]] = {}
        for e in sample.expressions:
            groups.setdefault(tuple(e.targets), []).append(e)
        stem = Path(sample.file_name).stem
        for targets, exprs in groups.items():
            ref_id += 1
            sentences = []
            for e in exprs:
                sent_id += 1
                kinds[e.kind] += 1
                sent = e.text.lower()
                sentences.append({"tokens": sent.split(), "raw": e.text, "sent_id": sent_id, "sent": sent,
                                  "kind": e.kind})
            ann_ids = [ann_id_for(index, t) for t in targets]
            multi = len(targets) > 1
            refs.append({
                "sent_ids": [st["sent_id"] for st in sentences],
                # As in REFER: "<image stem>_<ann id>" plus the image's extension.
                "file_name": f"{stem}_{ann_ids[0]}{Path(sample.file_name).suffix}",
                "ann_id": ann_ids if multi else ann_ids[0],
                "ref_id": ref_id,
                "image_id": image_id,
                "split": split_of[index],
                "sentences": sentences,
                "category_id": [category[t] for t in targets] if multi else category[targets[0]],
            })

        grounded.append({
            "image_id": image_id,
            "file_name": sample.file_name,
            "height": sample.height,
            "width": sample.width,
            "split": split_of[index],
            "caption": sample.caption,
            "caption_ann_ids": [ann_id_for(index, t) for t in sample.caption_targets],
            "region_questions": [{"box_xyxy": list(q.box), "question": q.question, "answer": q.answer,
                                  "ann_id": ann_id_for(index, q.target)} for q in sample.region_questions],
            "box_answers": [{"question": b.question, "answer": b.answer, "ann_id": ann_id_for(index, b.target)}
                            for b in sample.box_answers],
        })

    instances_path = ann_dir / "instances.json"
    save_json(instances_path, {
        "info": {"description": f"groundseg shapes world, seed {seed}", "version": "1.0"},
        "images": coco_images,
        "annotations": coco_anns,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)],
    })
    refs_path = ann_dir / "refs(unc).p"
    with atomic_write(refs_path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(refs, f, protocol=2)
    grounded_path = ann_dir / "grounded(unc).json"
    save_json(grounded_path, {
        "info": {
            "description": "Grounded text per image of the shapes world.",
            "caption": "GLaMM GCG caption: each object is '<p>phrase</p> [SEG]', objects by colour, "
                       "shape, size, then left to right",
            "caption_ann_ids": "annotation id (instances.json) of each [SEG] of caption, in order",
            "region_questions": "box_xyxy: visible box of ann_id in pixels [x1, y1, x2, y2), exclusive x2/y2; "
                                "the <bbox> token in question stands for it",
            "box_answers": "answer: <ref>expression</ref><box>(x1,y1),(x2,y2)</box>, box of ann_id on the "
                           "0-1000 grid (round(x * 1000 / width))",
        },
        "images": grounded,
    })

    gcg_files = _write_gcg(out / "gcg", grounded, coco_anns)

    summary = {
        "out_dir": str(out),
        "images": images,
        "annotations": len(coco_anns),
        "refs": len(refs),
        "sentences": sent_id,
        "kinds": dict(kinds),
        "splits": dict(Counter(split_of)),
        "videos": videos,
        "video_expressions": 0,
        "files": [str(instances_path), str(refs_path), str(grounded_path), *gcg_files],
    }
    if videos > 0:
        summary["video_expressions"] = _write_videos(video_dir, world, videos, splits)
        summary["files"] += [str(video_dir / "meta_expressions.json"), str(video_dir / "meta.json")]
    return summary


def _write_gcg(gcg_dir: Path, grounded: list[dict], coco_anns: list[dict]) -> list[str]:
    """Per split, GranD-f's GCG evaluation pair and a GLaMM-style region-caption file (see :func:`write_shapes`).

    GCG: the mask file lists each image's objects in caption order (category 1), the caption file the caption
    without markup and its phrases as ``labels`` in the same order, so phrase k names mask k. Region captions: one
    "image" per region question (``id`` = annotation id), ``bbox`` xywh of the object's visible box, ``caption``
    the answer."""
    from groundseg.grounding.tokens import parse_phrases, strip_grounding

    gcg_dir.mkdir(parents=True, exist_ok=True)
    by_id = {a["id"]: a for a in coco_anns}
    files: list[str] = []
    for split in sorted({g["split"] for g in grounded}):
        images, masks, caps, reg_images, reg_anns = [], [], [], [], []
        for g in (g for g in grounded if g["split"] == split):
            image = {k: g[k] for k in ("file_name", "height", "width")}
            images.append({"id": g["image_id"], **image})
            for ann_id in g["caption_ann_ids"]:
                a = by_id[ann_id]
                masks.append({"id": ann_id, "image_id": g["image_id"], "category_id": 1, "bbox": a["bbox"],
                              "area": a["area"], "iscrowd": 0, "segmentation": a["segmentation"]})
            caps.append({"id": g["image_id"], "image_id": g["image_id"], "caption": strip_grounding(g["caption"]),
                         "labels": [p.phrase for p in parse_phrases(g["caption"])]})
            for q in g["region_questions"]:
                rid = len(reg_images) + 1
                x1, y1, x2, y2 = q["box_xyxy"]
                reg_images.append({"id": rid, **image})
                reg_anns.append({"id": rid, "image_id": rid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                 "caption": q["answer"], "ann_id": q["ann_id"]})
        category = [{"id": 1, "name": "object"}]
        for name, doc in ((f"{split}_gcg_coco_mask_gt.json", {"images": images, "annotations": masks,
                                                                "categories": category}),
                          (f"{split}_gcg_coco_caption_gt.json", {"images": images, "annotations": caps}),
                          (f"{split}_regcap_coco_caption_gt.json", {"images": reg_images, "annotations": reg_anns})):
            save_json(gcg_dir / name, doc)
            files.append(str(gcg_dir / name))
    return files


def _write_videos(video_dir: Path, world: ShapesWorld, count: int, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> int:
    """Write ``count`` videos in the Ref-YouTube-VOS layout (flat, and per split as released: see
    :func:`_link_video_splits`); returns the number of expressions."""
    palette = _voc_palette()
    meta_expressions, meta, total = {}, {}, 0
    for index in range(count):
        v = world.video(index)
        names = [f"{t:05d}" for t in range(len(v.frames))]
        (video_dir / "JPEGImages" / v.name).mkdir(parents=True, exist_ok=True)
        (video_dir / "Annotations" / v.name).mkdir(parents=True, exist_ok=True)
        for t, name in enumerate(names):
            save_jpeg(video_dir / "JPEGImages" / v.name / f"{name}.jpg", v.frames[t], quality=95)
            labels = np.zeros(v.frames[t].shape[:2], np.uint8)
            for obj_id, m in v.masks.items():  # visible masks are disjoint, so the order does not matter
                labels[m[t]] = obj_id
            _save_png(video_dir / "Annotations" / v.name / f"{name}.png", labels, palette)
        meta_expressions[v.name] = {
            "expressions": {str(i): {"exp": e.text, "obj_id": str(e.targets[0]), "kind": e.kind}
                            for i, e in enumerate(v.expressions)},
            "frames": names,
        }
        meta[v.name] = {"objects": {
            str(o.id): {"category": o.shape, "frames": [names[t] for t in np.flatnonzero(v.masks[o.id].any((1, 2)))]}
            for o in v.objects
        }}
        total += len(v.expressions)
    save_json(video_dir / "meta_expressions.json", {"videos": meta_expressions})
    save_json(video_dir / "meta.json", {"videos": meta})
    _link_video_splits(video_dir, meta_expressions, _split_names(count, splits))
    return total


def _link_video_splits(video_dir: Path, meta_expressions: dict, split_of: list[str]) -> None:
    """The same videos in the official Ref-YouTube-VOS release layout, one folder per split (video k in the split
    of image k's rule): ``<split>/JPEGImages/<vid>/``, ``<split>/Annotations/<vid>/`` (hard links to the files
    above where the filesystem allows, copies otherwise) and ``meta_expressions/<split>/meta_expressions.json``."""
    import shutil

    names = list(meta_expressions)
    for split in sorted(set(split_of)):
        chosen = [n for n, s in zip(names, split_of) if s == split]
        for vid in chosen:
            for kind in ("JPEGImages", "Annotations"):
                dest = video_dir / split / kind / vid
                dest.mkdir(parents=True, exist_ok=True)
                for src in sorted((video_dir / kind / vid).iterdir()):
                    target = dest / src.name
                    if target.exists():
                        target.unlink()
                    try:
                        os.link(src, target)
                    except OSError:
                        shutil.copyfile(src, target)
        (video_dir / "meta_expressions" / split).mkdir(parents=True, exist_ok=True)
        save_json(video_dir / "meta_expressions" / split / "meta_expressions.json",
                  {"videos": {n: meta_expressions[n] for n in chosen}})
