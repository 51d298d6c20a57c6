"""The ReasonSeg loader (LISA's polygon rasterisation with ignore = 255) on hand-made labelme files, the ReasonSeg
runner (questions, ignore pixels, short/long groups), `groundseg eval reasonseg` with the tiny preset, and
`groundseg eval rec` / its `boxes` alias."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from groundseg.cli import main
from groundseg.datasets.reasonseg import LONG_QUESTION, SHORT_QUESTION, load_reasonseg, reasonseg_mask
from groundseg.io import InputError

H, W = 30, 40


def _rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


@pytest.fixture()
def reasonseg_root(tmp_path):
    folder = tmp_path / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(folder / f"{name}.jpg"), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    # a: a target with a smaller ignore region over its corner (drawn later, so it wins), a skipped flag, and
    # fractional vertices, which truncate (5.9 -> 5).
    (folder / "a.json").write_text(json.dumps({
        "text": ["the red thing", "another phrasing"], "is_sentence": False, "imageHeight": H, "imageWidth": W,
        "shapes": [{"label": "target", "points": _rect(5.9, 5, 20, 15)},
                   {"label": "ignore", "points": _rect(15, 10, 25, 20)},
                   {"label": "flag", "points": _rect(0, 0, 39, 29)}]}))
    # b: a small target inside a large ignore region (no imageHeight: the size comes from the image).
    (folder / "b.json").write_text(json.dumps({
        "text": "What would you sit on here?", "is_sentence": True,
        "shapes": [{"label": "target", "points": _rect(2, 2, 6, 6)},
                   {"label": "Ignore", "points": _rect(0, 0, 30, 20)}]}))
    return tmp_path


def _expected():
    a = np.zeros((H, W), np.uint8)
    a[5:16, 5:21] = 1
    a[10:21, 15:26] = 255
    b = np.zeros((H, W), np.uint8)
    b[0:21, 0:31] = 255
    b[2:7, 2:7] = 1
    return a, b


def test_loader_and_masks(reasonseg_root):
    samples = load_reasonseg(reasonseg_root, "val")
    assert [s.name for s in samples] == ["a", "b"]
    a, b = samples
    assert a.texts == ("the red thing", "another phrasing") and a.kind == "short" and a.question == SHORT_QUESTION
    assert b.texts == ("What would you sit on here?",) and b.kind == "long" and b.question == LONG_QUESTION
    assert (a.height, a.width) == (b.height, b.width) == (H, W)
    ea, eb = _expected()
    assert np.array_equal(a.mask(), ea) and np.array_equal(b.mask(), eb)
    # The same three levels of --data-root are accepted.
    assert [s.name for s in load_reasonseg(reasonseg_root / "ReasonSeg", "val")] == ["a", "b"]


def test_loader_errors(reasonseg_root):
    with pytest.raises(InputError, match="ReasonSeg split 'test' not found"):
        load_reasonseg(reasonseg_root, "test")
    bad = reasonseg_root / "ReasonSeg" / "val" / "b.json"
    bad.write_text(json.dumps({"text": "x", "shapes": []}))
    with pytest.raises(InputError, match=r"b\.json: missing keys \['is_sentence'\]"):
        load_reasonseg(reasonseg_root, "val")
    with pytest.raises(InputError, match="polygon points must be"):
        reasonseg_mask([{"label": "target", "points": [1, 2, 3]}], 5, 5, "x.json")


class Everything:
    """Predicts the whole image, and records what it was asked."""

    def __init__(self):
        self.asked = []

    def segment_teacher_forced(self, image, expressions, question=None):
        self.asked += [question.format(e) for e in expressions]
        h, w = np.asarray(image).shape[:2]
        return torch.ones(len(expressions), h, w)


def test_runner_asks_lisas_questions_and_ignores_255(reasonseg_root, tmp_path):
    from groundseg.eval.reasonseg import evaluate_reasonseg, score_reasonseg_predictions

    model = Everything()
    out = tmp_path / "run"
    result = evaluate_reasonseg(model, str(reasonseg_root), "val", progress=False, out=str(out), model_name="x")
    assert model.asked == ["What is the red thing in this image? Please output segmentation mask.",
                           "What would you sit on here? Please output segmentation mask."]
    ea, eb = _expected()
    # the whole image: I = target pixels, U = every pixel that is not ignored
    ia, ua = int((ea == 1).sum()), int((ea != 255).sum())
    ib, ub = int((eb == 1).sum()), int((eb != 255).sum())
    assert (ia, ua, ib, ub) == (140, 1079, 25, 574)
    report = json.loads((out / "report.json").read_text())
    assert report["cIoU"] == pytest.approx((ia + ib) / (ua + ub))
    assert report["gIoU"] == pytest.approx((ia / ua + ib / ub) / 2)
    assert report["by_kind"]["short"]["gIoU"] == pytest.approx(ia / ua)
    assert report["by_kind"]["long"]["cIoU"] == pytest.approx(ib / ub)
    assert (report["dataset"], report["num_images"], report["num_expressions"]) == ("ReasonSeg", 2, 2)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["sent_id"], r["image_id"]) for r in lines] == [(0, "a"), (1, "b")]
    # Scoring the run's own predictions gives the same numbers.
    scored = score_reasonseg_predictions(str(out / "predictions.jsonl"), str(reasonseg_root), "val").report
    assert (scored["cIoU"], scored["gIoU"], scored["missing"]) == (report["cIoU"], report["gIoU"], 0)


def test_reasonseg_command_with_the_tiny_preset(reasonseg_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "reasonseg", "--data-root", str(reasonseg_root), "--split", "val", "--model", "lisa-tiny",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["group", "cIoU", "gIoU", "Prec@0.5", "n"]
    report = json.loads((out / "report.json").read_text())
    assert set(report["by_kind"]) == {"short", "long"} and report["protocol"] == "teacher-forced"
    assert (out / "iou_hist.png").is_file()
    assert main(["eval", "reasonseg", "--data-root", str(reasonseg_root), "--split", "test"]) == 2
    assert "ReasonSeg split 'test' not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shapes_dir(shapes_folder):
    return shapes_folder(seed=3, images=20)


def test_rec_command_and_boxes_alias(shapes_dir, tmp_path, capsys):
    from groundseg.datasets.refer import load_refer

    refer = load_refer(shapes_dir, "shapes", "unc")
    single = [s for s in refer.sentences("val") if len(s.ann_ids) == 1]
    out = tmp_path / "rec"
    args = ["eval", "rec", "--data-root", str(shapes_dir), "--dataset", "shapes", "--model", "lisa-tiny"]
    assert main(args + ["--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["group", "Acc@0.5", "mIoU", "n"]
    report = json.loads((out / "report.json").read_text())
    assert {"accuracy@0.5", "mIoU", "num_expressions", "num_images", "dataset", "split", "model", "protocol",
            "seconds", "by_kind"} <= set(report)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["sent_id"] for r in lines] == [s.sent_id for s in single] and report["num_expressions"] == len(single)
    assert report["accuracy@0.5"] == sum(r["iou"] >= 0.5 for r in lines) / len(lines)
    assert main(["eval", "boxes"] + args[2:]) == 0
    assert capsys.readouterr().out.splitlines() == table.splitlines()[:-1]  # less the "wrote ..." line
    assert main(args + ["--protocol", "teacher-forced"]) == 2
    assert "box grounding always generates" in capsys.readouterr().err
