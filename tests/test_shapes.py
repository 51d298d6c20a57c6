"""Tests for the procedural shapes world: determinism, exact masks, unambiguous language, on-disk round trips."""

from __future__ import annotations

import itertools
import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from groundseg.datasets.refer import load_refer
from groundseg.datasets.shapes import (
    COLORS,
    EXPRESSION_KINDS,
    SHAPES,
    SIZES,
    ShapesWorld,
    ann_id_for,
    image_id_for,
    write_shapes,
)
from groundseg.datasets.ytvos import load_ytvos
from groundseg.grounding.tokens import BBOX, count_seg, parse_boxes, parse_phrases
from groundseg.io import mask_to_bbox, masks_to_boxes_xyxy

N_IMAGES = 40
N_VIDEOS = 10


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=0)


@pytest.fixture(scope="module")
def samples(world):
    return [world.image(i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def videos(world):
    return [world.video(i) for i in range(N_VIDEOS)]


# --------------------------------------------------------------------------- #
# An independent reading of the expressions: words -> the objects they fit
# --------------------------------------------------------------------------- #

_SINGULAR = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "shape": None, "shapes": None}


def parse_noun(phrase: str) -> dict:
    """"small red circle" / "red shapes" / "circle" -> {"size": ..., "color": ..., "shape": ...} (only words said)."""
    words = phrase.split()
    assert words and words[-1] in _SINGULAR, phrase
    attrs = {}
    if _SINGULAR[words[-1]] is not None:
        attrs["shape"] = _SINGULAR[words[-1]]
    for w in words[:-1]:
        if w in SIZES:
            attrs["size"] = w
        elif w in COLORS:
            attrs["color"] = w
        else:
            raise AssertionError(f"unexpected word {w!r} in {phrase!r}")
    return attrs


def fits(obj, attrs: dict) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def matching(objects, phrase: str) -> list:
    attrs = parse_noun(phrase)
    return [o for o in objects if fits(o, attrs)]


def resolve(sample, text: str, scale: float) -> list[int]:
    """Object ids an expression refers to, decided from its words and the scene alone (asserts if ambiguous)."""
    objs = sample.objects
    if m := re.fullmatch(r"the (.+) (left of|right of|above|below) (the .+)", text):
        (anchor,) = resolve(sample, m.group(3), scale)
        anchor = next(o for o in objs if o.id == anchor)
        axis = 0 if "of" in m.group(2) else 1
        sign = -1 if m.group(2) in ("left of", "above") else 1
        cands = [o for o in matching(objs, m.group(1)) if o.id != anchor.id]
        offsets = {o.id: sign * (o.center[axis] - anchor.center[axis]) for o in cands}
        clear = [i for i, d in offsets.items() if d > 0.1 * scale]
        assert len(clear) == 1, text
        assert all(d <= 0.03 * scale for i, d in offsets.items() if i not in clear), text
        return clear
    if m := re.fullmatch(r"the (left|right|top|bottom)most (.+)", text):
        return [_ordinal(matching(objs, m.group(2)), m.group(1), 0, scale, text)]
    if m := re.fullmatch(r"the (second|third) (.+) from the (left|right|top|bottom)", text):
        return [_ordinal(matching(objs, m.group(2)), m.group(3), 1 if m.group(1) == "second" else 2, scale, text)]
    if m := re.fullmatch(r"the (largest|smallest) (.+)", text):
        group = sorted(matching(objs, m.group(2)), key=lambda o: o.area, reverse=m.group(1) == "largest")
        assert len(group) >= 2, text
        ratio = group[0].area / group[1].area
        assert (ratio >= 1.5) if m.group(1) == "largest" else (ratio <= 1 / 1.5), text
        return [group[0].id]
    if m := re.fullmatch(r"(?:all the|every|both) (.+)", text):
        return [o.id for o in matching(objs, m.group(1))]
    if text in REASONING:
        key, value = REASONING[text]
        return [o.id for o in objs if getattr(o, key) == value]
    if m := re.fullmatch(r"the (.+)", text):
        return [o.id for o in matching(objs, m.group(1))]
    raise AssertionError(f"cannot read {text!r}")


def _ordinal(group, side: str, k: int, scale: float, text: str) -> int:
    axis = 0 if side in ("left", "right") else 1
    group = sorted(group, key=lambda o: o.center[axis], reverse=side in ("right", "bottom"))
    assert len(group) > k and len(group) >= 2, text
    pos = [o.center[axis] for o in group]
    # Neighbours in the order must be clearly apart (a weaker bound than the generator's 0.08).
    if k > 0:
        assert abs(pos[k] - pos[k - 1]) >= 0.05 * scale, text
    if k + 1 < len(pos):
        assert abs(pos[k + 1] - pos[k]) >= 0.05 * scale, text
    return group[k].id


REASONING = {
    "the shape with three corners": ("shape", "triangle"), "the shape with three sides": ("shape", "triangle"),
    "the shape with four right angles": ("shape", "square"), "the shape with six corners": ("shape", "hexagon"),
    "the shape shaped like a honeycomb cell": ("shape", "hexagon"), "the shape with five points": ("shape", "star"),
    "the round shape": ("shape", "circle"), "the shape with no corners": ("shape", "circle"),
    "the shape like the diamond suit on playing cards": ("shape", "diamond"),
    "something the colour of grass": ("color", "green"), "the shape the colour of a leaf": ("color", "green"),
    "something the colour of the sky": ("color", "blue"), "the shape the colour of the sea": ("color", "blue"),
    "something the colour of a banana": ("color", "yellow"), "the shape the colour of a lemon": ("color", "yellow"),
    "something the colour of blood": ("color", "red"), "the shape the colour of a strawberry": ("color", "red"),
    "something the colour of an orange": ("color", "orange"), "the shape the colour of a carrot": ("color", "orange"),
    "something the colour of lavender": ("color", "purple"), "the shape the colour of grapes": ("color", "purple"),
}


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def _fingerprint(sample) -> tuple:
    objs = tuple((o.id, o.shape, o.color, o.size, o.center, o.radius, o.angle, o.box, o.area, o.mask.tobytes())
                 for o in sample.objects)
    exprs = tuple((e.text, e.kind, tuple(e.targets)) for e in sample.expressions)
    return (sample.image.tobytes(), objs, exprs, sample.caption, tuple(sample.caption_targets),
            tuple((q.box, q.question, q.answer, q.target) for q in sample.region_questions),
            tuple((b.question, b.answer, b.target) for b in sample.box_answers))


def test_images_are_deterministic_and_random_access(world, samples):
    # Same (seed, index) -> identical, whatever was generated before and in which world object.
    fresh = ShapesWorld(seed=0)
    assert _fingerprint(fresh.image(7)) == _fingerprint(samples[7])
    assert _fingerprint(world.image(3)) == _fingerprint(samples[3])
    # Another seed or index gives another image.
    assert not np.array_equal(ShapesWorld(seed=1).image(7).image, samples[7].image)
    assert not np.array_equal(samples[8].image, samples[7].image)
    assert samples[7].image.shape == (256, 256, 3) and samples[7].image.dtype == np.uint8
    assert samples[7].file_name == "shapes_000007.png"


def test_image_size_is_configurable():
    sample = ShapesWorld(seed=0, image_size=(96, 128)).image(0)
    assert sample.image.shape == (96, 128, 3)
    assert all(o.mask.shape == (96, 128) for o in sample.objects)


def test_masks_boxes_and_areas(samples):
    counts = set()
    for sample in samples:
        counts.add(len(sample.objects))
        assert 1 <= len(sample.objects) <= 8
        assert [o.id for o in sample.objects] == list(range(1, len(sample.objects) + 1))
        stack = np.stack([o.mask for o in sample.objects])
        assert stack.dtype == bool and stack.shape[1:] == sample.image.shape[:2]
        assert stack.sum(axis=0).max() <= 1, "visible masks overlap"
        boxes = masks_to_boxes_xyxy(stack)
        for o, box in zip(sample.objects, boxes):
            assert o.area == int(o.mask.sum()) > 0
            assert o.box == tuple(float(v) for v in box)
            x, y, w, h = mask_to_bbox(o.mask)
            assert o.box == (x, y, x + w, y + h)
            # At least ~60% of the full shape (pi r^2 by construction; 0.55 leaves room for rasterisation).
            full = np.pi * (SIZES[o.size] * 256) ** 2
            assert o.area >= 0.55 * full, (sample.index, o.id, o.area, full)
    assert len(counts) >= 5, "object counts should vary between 1 and 8"


def test_mask_pixels_are_exactly_the_painted_pixels(samples):
    base = np.array(list(COLORS.values()), float)  # (6, 3)
    names = list(COLORS)
    for sample in samples:
        img = sample.image.astype(float)
        for o in sample.objects:
            pixels = img[o.mask]  # (P, 3)
            nearest = np.argmin(((pixels[:, None, :] - base[None]) ** 2).sum(-1), axis=1)
            assert (nearest == names.index(o.color)).all(), (sample.index, o.id, o.color)
        # Objects are saturated and the background grey: chroma tells them apart pixel for pixel.
        chroma = img.max(axis=2) - img.min(axis=2)
        painted = np.any([o.mask for o in sample.objects], axis=0)
        assert chroma[painted].min() > 80 and chroma[~painted].max() < 60, sample.index


def test_expressions_are_unambiguous(samples):
    kinds = {k: 0 for k in EXPRESSION_KINDS}
    for sample in samples:
        assert sample.expressions
        for e in sample.expressions:
            assert e.kind in EXPRESSION_KINDS
            kinds[e.kind] += 1
            found = resolve(sample, e.text, 256.0)
            if e.kind == "multi":
                assert len(e.targets) >= 2
                xs = [next(o for o in sample.objects if o.id == t).center[0] for t in e.targets]
                assert xs == sorted(xs), e.text
                assert sorted(found) == sorted(e.targets), (sample.index, e.text)
            else:
                assert len(e.targets) == 1
                assert found == e.targets, (sample.index, e.text, found, e.targets)
    assert all(n >= 10 for n in kinds.values()), kinds


def test_every_describable_object_gets_an_attribute_expression(samples):
    for sample in samples:
        described = {e.targets[0] for e in sample.expressions if e.kind == "attribute"}
        for o in sample.objects:
            twins = [p for p in sample.objects if (p.shape, p.color, p.size) == (o.shape, o.color, o.size)]
            assert (o.id in described) == (len(twins) == 1), (sample.index, o.id)


def test_grounded_caption(samples):
    for sample in samples:
        phrases = parse_phrases(sample.caption)
        assert len(phrases) == count_seg(sample.caption) == len(sample.objects) == len(sample.caption_targets)
        assert [p.seg_index for p in phrases] == list(range(len(phrases)))
        assert sample.caption.endswith("</p> [SEG]")  # no final punctuation: callers add their own
        by_id = {o.id: o for o in sample.objects}
        # Listed by colour, then shape, then size (COLORS/SHAPES/SIZES order), then left to right.
        keys = [(list(COLORS).index(by_id[t].color), SHAPES.index(by_id[t].shape), list(SIZES).index(by_id[t].size),
                 by_id[t].center[0]) for t in sample.caption_targets]
        assert keys == sorted(keys)
        for phrase, target in zip(phrases, sample.caption_targets):
            article, noun = phrase.phrase.split(" ", 1)
            assert article == ("an" if noun[0] in "aeiou" else "a")
            attrs = parse_noun(noun)
            o = by_id[target]
            assert fits(o, attrs) and {"color", "shape"} <= set(attrs), (phrase.phrase, o)
            # Unique-ish: only exact twins (same size, colour and shape) share a phrase.
            assert all((p.size, p.color, p.shape) == (o.size, o.color, o.shape)
                       for p in matching(sample.objects, noun)), phrase.phrase


def test_region_questions_and_box_answers(samples):
    for sample in samples:
        h, w = sample.image.shape[:2]
        by_id = {o.id: o for o in sample.objects}
        assert sorted(q.target for q in sample.region_questions) == sorted(by_id)
        for q in sample.region_questions:
            o = by_id[q.target]
            assert q.box == o.box and q.question.count(BBOX) == 1
            assert q.answer.split()[1:] == [o.size, o.color, o.shape]
        singles = [e for e in sample.expressions if len(e.targets) == 1]
        assert len(sample.box_answers) == len(singles)
        for b, e in zip(sample.box_answers, singles):
            assert b.question == f"Where is {e.text}?" and b.target == e.targets[0]
            (parsed,) = parse_boxes(b.answer, (h, w))
            assert parsed.phrase == e.text
            grid = np.array([w, h, w, h]) / 1000.0  # one grid unit in pixels
            assert np.all(np.abs(np.array(parsed.box) - np.array(by_id[b.target].box)) <= grid + 1e-9)


# --------------------------------------------------------------------------- #
# Videos
# --------------------------------------------------------------------------- #


def test_videos_are_deterministic(world, videos):
    again = ShapesWorld(seed=0).video(2)
    assert all(np.array_equal(a, b) for a, b in zip(again.frames, videos[2].frames))
    assert [(e.text, e.targets) for e in again.expressions] == [(e.text, e.targets) for e in videos[2].expressions]
    assert not np.array_equal(world.image(2).image, videos[2].frames[0])


def test_video_masks_and_motion_expressions(videos):
    for v in videos:
        assert 2 <= len(v.objects) <= 4 and len(v.frames) == 16
        stack = np.stack([v.masks[o.id] for o in v.objects])  # (N, T, H, W)
        assert stack.sum(axis=0).max() <= 1
        for o in v.objects:
            assert v.masks[o.id].shape == (16, 256, 256)
        for e in v.expressions:
            assert e.kind in ("motion", "attribute") and len(e.targets) == 1
            if e.kind == "attribute":
                assert [p.id for p in matching(v.objects, e.text[len("the "):])] == e.targets, e.text
                continue
            m = re.fullmatch(r"the (.+) moving (left|right|up|down)", e.text)
            assert m, e.text
            # Direction of each step from the trajectory itself; a wrap-around jump is not a step.
            frac = {}
            for o in matching(v.objects, m.group(1)):
                d = np.diff(o.centers, axis=0)
                d = d[np.abs(d).max(axis=1) < 0.5 * 256]
                words = np.where(np.abs(d[:, 0]) >= np.abs(d[:, 1]), np.where(d[:, 0] < 0, "left", "right"),
                                 np.where(d[:, 1] < 0, "up", "down"))
                frac[o.id] = float(np.mean(words == m.group(2)))
            assert frac[e.targets[0]] >= 0.8, (e.text, frac)
            assert all(f <= 0.2 for i, f in frac.items() if i != e.targets[0]), (e.text, frac)
    assert sum(e.kind == "motion" for v in videos for e in v.expressions) >= N_VIDEOS


def test_objects_cross_and_some_leave_and_reenter(videos):
    crossing = sum(
        any((np.linalg.norm(a.centers - b.centers, axis=1) < a.radius + b.radius).any()
            for a, b in itertools.combinations(v.objects, 2))
        for v in videos
    )
    assert crossing >= N_VIDEOS // 2
    wrapping = [(v, o) for v in videos for o in v.objects if o.wraps]
    assert wrapping
    for v, o in wrapping:
        assert o.id in v.reentering
        visible = v.masks[o.id].any(axis=(1, 2))
        seen = np.flatnonzero(visible)
        gap = [t for t in range(seen[0], seen[-1]) if not visible[t]]
        assert gap, "a wrapping object must vanish between visible frames"
        # Vanished because it is out of the frame, not only hidden behind another object.
        x, y = o.centers[gap[0]]
        assert not (o.radius <= x <= 256 - o.radius and o.radius <= y <= 256 - o.radius)
        assert min(x, y) < -o.radius + 1 or max(x, y) > 256 + o.radius - 1


# --------------------------------------------------------------------------- #
# Files on disk
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = write_shapes(out, seed=3, images=12, videos=2, splits=(0.5, 0.25, 0.25))
    return out, summary, ShapesWorld(seed=3)


def test_write_shapes_refer_round_trip(written):
    out, summary, world = written
    samples = [world.image(i) for i in range(12)]
    refer = load_refer(out, "shapes", "unc")
    assert summary["images"] == 12 and summary["splits"] == {"train": 6, "val": 3, "test": 3}
    assert (out / "shapes" / "refs(unc).p").read_bytes()[:2] == b"\x80\x02"  # pickle protocol 2

    # Images: exact pixels, COCO entries, masks decoded by pycocotools itself.
    for s in samples:
        assert np.array_equal(np.asarray(Image.open(out / "images" / s.file_name)), s.image)
        img = refer.images[image_id_for(s.index)]
        assert (img["file_name"], img["height"], img["width"]) == (s.file_name, 256, 256)
        for o in s.objects:
            ann = refer.anns[ann_id_for(s.index, o.id)]
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), o.mask)
            assert ann["bbox"] == mask_to_bbox(o.mask) and ann["area"] == o.area and ann["iscrowd"] == 0
            assert refer.categories[ann["category_id"]]["name"] == o.shape
    assert len(refer.anns) == summary["annotations"] == sum(len(s.objects) for s in samples)

    # Refs: every expression once, with its kind, under the ref of its target set; the mask is the union.
    split_of_image = {}
    texts = []
    for ref in refer.refs:
        s = samples[ref["image_id"] - 1]
        split_of_image.setdefault(ref["image_id"], set()).add(ref["split"])
        targets = [a - image_id_for(s.index) * 100 for a in refer.ann_ids(ref)]
        assert isinstance(ref["ann_id"], list) == (len(targets) > 1)
        assert ref["file_name"].startswith(s.file_name[:-4] + "_")
        expected = np.any([o.mask for o in s.objects if o.id in targets], axis=0)
        assert np.array_equal(refer.mask(ref), expected)
        for sent in ref["sentences"]:
            assert sent["kind"] in EXPRESSION_KINDS and sent["tokens"] == sent["sent"].split()
            texts.append((s.index, sent["raw"], tuple(targets)))
    assert sorted(texts) == sorted((s.index, e.text, tuple(e.targets)) for s in samples for e in s.expressions)
    assert all(len(v) == 1 for v in split_of_image.values())
    by_split = {sp: sorted(i for i, v in split_of_image.items() if sp in v) for sp in ("train", "val", "test")}
    assert sorted(sum(by_split.values(), [])) == sorted(split_of_image)  # a partition
    assert by_split["train"] == [image_id_for(i) for i in range(6)]
    samples_seen = list(refer.sentences())
    assert len(samples_seen) == summary["sentences"] == len(texts)
    assert all(x.kind in EXPRESSION_KINDS for x in samples_seen)
    assert {x.image_id for x in refer.sentences("val")} == {image_id_for(i) for i in (6, 7, 8)}

    # The pickle holds only plain containers: the ordinary pickle module agrees with the restricted one.
    with open(out / "shapes" / "refs(unc).p", "rb") as f:
        assert pickle.load(f) == refer.refs


def test_write_shapes_grounded_json(written):
    out, _, world = written
    data = json.loads((out / "shapes" / "grounded(unc).json").read_text())
    assert len(data["images"]) == 12
    for entry in data["images"]:
        s = world.image(entry["image_id"] - 1)
        assert entry["caption"] == s.caption
        assert entry["caption_ann_ids"] == [ann_id_for(s.index, t) for t in s.caption_targets]
        assert [q["box_xyxy"] for q in entry["region_questions"]] == [list(q.box) for q in s.region_questions]
        assert [b["answer"] for b in entry["box_answers"]] == [b.answer for b in s.box_answers]


def test_write_shapes_videos_round_trip(written):
    out, summary, world = written
    ds = load_ytvos(out / "videos")
    assert len(ds) == 2 and summary["video_expressions"] == sum(len(v.expressions) for v in ds)
    for index in range(2):
        v = world.video(index)
        entry = ds[v.name]
        assert entry.frames == [f"{t:05d}" for t in range(16)]
        assert all(p.is_file() for p in entry.frame_paths)
        frame = np.asarray(Image.open(entry.frame_paths[0]))
        assert frame.shape == (256, 256, 3) and np.abs(frame.astype(int) - v.frames[0]).mean() < 4  # JPEG q95
        assert [(e.text, e.obj_id, e.kind) for e in entry.expressions] == [
            (e.text, e.targets[0], e.kind) for e in v.expressions]
        for o in v.objects:
            streamed = np.stack(list(ds.masks(entry, o.id)))
            assert np.array_equal(streamed, v.masks[o.id])
            visible = [entry.frames[t] for t in range(16) if v.masks[o.id][t].any()]
            assert entry.objects[o.id] == {"category": o.shape, "frames": visible}
        with Image.open(entry.mask_paths[0]) as png:
            assert png.mode == "P"
