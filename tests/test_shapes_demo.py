"""The shipped default model (``groundseg/assets/shapes-demo``, trained by ``groundseg train --preset shapes-demo``):
it is what load_model() gives, it fits in the package, and it segments held-out shapes-world images (seed 1;
training used seed 0)."""

from __future__ import annotations

import numpy as np
import pytest

from groundseg.datasets.shapes import ShapesWorld
from groundseg.eval.metrics import IoUMeter
from groundseg.hub import ASSETS

EXAMPLE = ASSETS.parent.parent / "examples" / "shapes.png"
# Measured on the shipped weights (2026-11-27, second release): attribute cIoU 0.905 teacher-forced and 0.905 in chat
# (n = 80) on these 20 held-out images, every chat answer naming its expression (80/80); box answers to the same
# expressions with IoU >= 0.5 for 80/80; the README's purple circle at IoU 0.91 both ways. The bounds leave room for
# numerical noise only.
ATTRIBUTE_BOUND = 0.8
BOX_BOUND = 0.85
README_PROMPT, README_ANSWER, README_TARGET = "the purple circle", "Sure, {} [SEG].", ("purple", "circle")


@pytest.fixture(scope="module")
def demo():
    from groundseg import load_model

    return load_model()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_default_model_is_the_shipped_shapes_demo(demo):
    assert demo.config.preset == "shapes-demo"
    weights = ASSETS / "shapes-demo" / "model.safetensors"
    assert weights.stat().st_size <= 30 * 2**20
    # trained, not the seeded random build: the weights differ from a fresh from-scratch model
    from groundseg.config import preset_config
    from groundseg.hub import build_model, load_tokenizer

    import torch

    torch.manual_seed(0)
    fresh = build_model(preset_config("shapes-demo"), load_tokenizer(ASSETS / "shapes-demo"))
    a = demo.state_dict()["sam.sam.mask_decoder.iou_token.weight"]
    assert not torch.allclose(a, fresh.state_dict()["sam.sam.mask_decoder.iou_token.weight"])


def test_attribute_expressions_on_held_out_images(demo):
    world = ShapesWorld(seed=1)
    meter = IoUMeter()
    for i in range(500, 520):
        item = world.image(i)
        by_id = {o.id: o for o in item.objects}
        attr = [e for e in item.expressions if e.kind == "attribute"]
        if not attr:
            continue
        logits = demo.segment_teacher_forced(item.image, [e.text for e in attr])
        for e, lg in zip(attr, logits):
            meter.add((lg > 0).numpy(), by_id[e.targets[0]].mask)
    s = meter.summary()["all"]
    assert s["n"] >= 60
    assert s["cIoU"] > ATTRIBUTE_BOUND, s


def test_readme_example_masks_the_named_object(demo):
    from groundseg.io import load_image

    item = ShapesWorld(seed=2).image(1)  # examples/shapes.png
    assert np.array_equal(load_image(EXAMPLE), item.image)
    target = next(o for o in item.objects if (o.color, o.shape) == README_TARGET)
    res = demo.segment(EXAMPLE, README_PROMPT, answer=README_ANSWER)[0]
    assert res.text == "Sure, the purple circle [SEG]." and len(res.masks) == 1
    assert iou(res.masks[0], target.mask) > 0.85


def _attribute_items(world, indices):
    for i in indices:
        item = world.image(i)
        attr = [e for e in item.expressions if e.kind == "attribute"]
        if attr:
            yield item, {o.id: o for o in item.objects}, attr


def test_chat_names_the_expression_and_segments_it(demo):
    # Generated answers, no teacher forcing: the model copies the expression into "Sure, <name>[SEG]." and the
    # mask of that [SEG] is the named object.
    meter, named, n = IoUMeter(), 0, 0
    for item, by_id, attr in _attribute_items(ShapesWorld(seed=1), range(500, 520)):
        for e, res in zip(attr, demo.segment(item.image, [e.text for e in attr])):
            n += 1
            named += res.text == f"Sure, {e.text}[SEG]."
            gt = by_id[e.targets[0]].mask
            meter.add(res.masks[0] if len(res.masks) == 1 else np.zeros_like(gt), gt)
    assert named >= 0.95 * n, (named, n)
    assert meter.summary()["all"]["cIoU"] > ATTRIBUTE_BOUND, meter.summary()["all"]


def test_readme_chat_command(demo):
    item = ShapesWorld(seed=2).image(1)
    target = next(o for o in item.objects if (o.color, o.shape) == README_TARGET)
    res = demo.segment(EXAMPLE, README_PROMPT)[0]
    assert res.text == "Sure, the purple circle[SEG]." and len(res.masks) == 1
    assert iou(res.masks[0], target.mask) > 0.85


def test_multi_target_questions_get_one_seg_per_named_object(demo):
    # What the model does with them (README, Numbers): several "name [SEG]" for a multi-target question. Which
    # objects it names is weak (multi cIoU 34), so only the form is held.
    item = ShapesWorld(seed=1).image(500)
    multi = next(e for e in item.expressions if e.kind == "multi")
    res = demo.segment(item.image, f"Segment {multi.text}.")[0]
    assert len(res.masks) >= 2 and res.text.count("[SEG]") == len(res.masks)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix)


def test_box_answers_box_the_named_object(demo):
    # "Where is X? Answer with a box." -> "<ref>X</ref><box>(x1,y1),(x2,y2)</box>", the coordinates written from the
    # mask of the <box> state (config.box_from_mask), scored against the generator's boxes.
    from groundseg.grounding.tokens import parse_boxes

    hits, n = 0, 0
    for item, by_id, attr in _attribute_items(ShapesWorld(seed=1), range(500, 520)):
        questions = [f"Where is {e.text}? Answer with a box." for e in attr]
        for e, res in zip(attr, demo.segment(item.image, questions, max_new_tokens=48)):
            assert res.text.startswith(f"<ref>{e.text}</ref><box>") and res.sources == ["box"]
            (box,) = parse_boxes(res.text, item.image.shape[:2])
            hits += box_iou(box.box, by_id[e.targets[0]].box) >= 0.5
            n += 1
    assert n == 80 and hits >= BOX_BOUND * n, (hits, n)
