"""Metrics against hand-computed values, the REFER/box runners against oracle and constant models on a shapes
dataset written to disk, and the eval/data commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groundseg.eval.metrics import IoUMeter, box_iou, format_table
from groundseg.result import Result


def test_ciou_giou_by_hand():
    m = IoUMeter()
    a_pred = np.zeros((4, 4), bool)
    a_pred[:2, :2] = True           # 4 px
    a_gt = np.zeros((4, 4), bool)
    a_gt[:2, :3] = True             # 6 px -> I=4, U=6
    b_pred = np.zeros((4, 4), bool)
    b_pred[3, 3] = True             # 1 px
    b_gt = np.zeros((4, 4), bool)
    b_gt[0, :] = True               # 4 px -> I=0, U=5
    empty = np.zeros((4, 4), bool)
    assert m.add(a_pred, a_gt, "x") == pytest.approx(4 / 6)
    assert m.add(b_pred, b_gt, "y") == 0.0
    assert m.add(empty, empty, "y") == 1.0  # LISA: empty target and empty prediction count as IoU 1
    s = m.summary()
    assert s["all"]["cIoU"] == pytest.approx(4 / 11)
    assert s["all"]["gIoU"] == pytest.approx((4 / 6 + 0 + 1) / 3)
    assert s["all"]["Prec@0.5"] == pytest.approx(2 / 3) and s["all"]["Prec@0.7"] == pytest.approx(1 / 3)
    assert s["x"]["n"] == 1 and s["y"]["cIoU"] == 0.0 and s["y"]["gIoU"] == 0.5
    assert list(s) == ["all", "x", "y"]
    assert "36.4" in format_table(s)  # cIoU 4/11 as a percentage


def test_ignore_pixels_count_in_neither_term():
    m = IoUMeter()
    pred = np.ones((2, 2), bool)
    gt = np.array([[1, 0], [0, 0]], bool)
    ignore = np.array([[0, 1], [1, 1]], bool)
    assert m.add(pred, gt, ignore=ignore) == 1.0


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0


@pytest.fixture(scope="module")
def shapes_dir(shapes_folder):
    return shapes_folder(seed=11, images=20)


class Everything:
    """A stand-in model that predicts the whole image for every expression."""

    def segment_teacher_forced(self, image, expressions, question=None):
        h, w = np.asarray(image).shape[:2]
        return torch.ones(len(expressions), h, w)

    def segment(self, image, prompts, max_new_tokens=0):
        h, w = np.asarray(image).shape[:2]
        m = np.ones((1, h, w), bool)
        return [Result(text="[SEG]", masks=m, scores=np.ones(1), boxes=np.array([[0, 0, w, h]], np.float32),
                       phrases=[None], sources=["seg"]) for _ in prompts]


def test_refer_runner_against_an_independent_count(shapes_dir):
    from groundseg.datasets.refer import load_refer
    from groundseg.eval.refer import evaluate_refer

    report = evaluate_refer(Everything(), str(shapes_dir), "shapes", "unc", split="train", progress=False)
    refer = load_refer(shapes_dir, "shapes", "unc")
    samples = list(refer.sentences("train"))
    # predicting everything: I = |gt|, U = H*W for every expression
    areas = np.array([refer.mask(refer.refs_by_id[s.ref_id]).sum() for s in samples], float)
    hw = np.array([s.height * s.width for s in samples], float)
    assert report.metrics["all"]["n"] == len(samples)
    assert report.metrics["all"]["cIoU"] == pytest.approx(areas.sum() / hw.sum())
    assert report.metrics["all"]["gIoU"] == pytest.approx(np.mean(areas / hw))
    kinds = {s.kind for s in samples}
    assert kinds <= set(report.metrics) and "multi" in kinds
    assert sum(report.metrics[k]["n"] for k in kinds) == len(samples)


@pytest.mark.parametrize("mode", ["teacher", "chat"])
def test_refer_runner_pairs_each_sentence_with_its_prediction(shapes_dir, mode):
    """An oracle that answers each sentence with that sentence's own mask scores 1 everywhere, so any mix-up
    between sentences and predictions would show."""
    from groundseg.datasets.refer import load_refer
    from groundseg.eval.refer import MULTI_QUESTION, SEG_QUESTION, evaluate_refer
    from groundseg.io import load_image

    refer = load_refer(shapes_dir, "shapes", "unc")
    truth = {}
    for s in refer.sentences("val"):
        key = load_image(shapes_dir / "images" / s.file_name).tobytes()
        truth[key, s.sentence] = refer.mask(refer.refs_by_id[s.ref_id])

    def lookup(image, question):
        for template in (SEG_QUESTION, MULTI_QUESTION):
            head, tail = template.split("{}")
            if question.startswith(head) and question.endswith(tail):
                hit = truth.get((np.asarray(image).tobytes(), question[len(head):len(question) - len(tail)]))
                if hit is not None:
                    return hit
        raise AssertionError(question)

    class Oracle:
        def segment_teacher_forced(self, image, expressions, question=None):
            return torch.stack([torch.from_numpy(lookup(image, question.format(e))).float() * 2 - 1
                                for e in expressions])

        def segment(self, image, prompts, max_new_tokens=0):
            out = []
            for p in prompts:
                m = lookup(image, p)[None]
                out.append(Result(text="[SEG]", masks=m, scores=np.ones(1), boxes=np.zeros((1, 4), np.float32),
                                  phrases=[None], sources=["seg"]))
            return out

    report = evaluate_refer(Oracle(), str(shapes_dir), "shapes", "unc", split="val", mode=mode, progress=False)
    assert report.metrics["all"]["gIoU"] == 1.0 and report.metrics["all"]["cIoU"] == 1.0
    assert report.metrics["all"]["n"] == len(truth)


def test_box_runner_with_an_oracle_and_a_mute_model(shapes_dir):
    from groundseg.datasets.refer import load_refer
    from groundseg.eval.refer import evaluate_boxes
    from groundseg.grounding.tokens import format_ref_box

    from groundseg.io import load_image

    refer = load_refer(shapes_dir, "shapes", "unc")
    boxes = {}  # (image bytes, sentence) -> the right answer
    for s in refer.sentences("val"):
        if len(s.ann_ids) == 1:
            x, y, w, h = refer.anns[s.ann_ids[0]]["bbox"]
            key = (load_image(shapes_dir / "images" / s.file_name).tobytes(), s.sentence)
            boxes[key] = format_ref_box(s.sentence, (x, y, x + w, y + h), (s.height, s.width))

    class Oracle(Everything):
        def segment(self, image, prompts, max_new_tokens=0):
            out = []
            for p in prompts:
                sent = p[len("Where is "):-len("? Answer with a box.")]
                out.append(Result(text=boxes[np.asarray(image).tobytes(), sent], masks=np.zeros((0, 1, 1), bool), scores=np.zeros(0),
                                  boxes=np.zeros((0, 4), np.float32), phrases=[], sources=[]))
            return out

    good = evaluate_boxes(Oracle(), str(shapes_dir), "shapes", "unc", split="val", progress=False)
    assert good.metrics["all"]["Acc@0.5"] == 1.0 and good.metrics["all"]["n"] == len(boxes)
    assert good.metrics["all"]["mIoU"] > 0.95  # the 0-1000 grid rounds the box a little
    bad = evaluate_boxes(Everything(), str(shapes_dir), "shapes", "unc", split="val", progress=False)
    assert bad.metrics["all"]["Acc@0.5"] == 0.0  # "[SEG]" holds no box


def test_eval_command_writes_a_report(shapes_dir, tmp_path, capsys):
    from groundseg.cli import main

    out = tmp_path / "run"
    assert main(["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "test",
                 "--model", "lisa-tiny", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["group", "cIoU", "gIoU", "Prec@0.5", "n"]
    report = json.loads((out / "report.json").read_text())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert report["split"] == "test" and report["num_expressions"] == len(lines) > 0
    assert main(["eval", "refer", "--data-root", str(tmp_path / "nowhere"), "--dataset", "shapes"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "nosuch"]) == 2
    assert "no sentences in split 'nosuch'" in capsys.readouterr().err
    assert main(["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes",
                 "--out", str(tmp_path / "report.json")]) == 2
    assert "--out " + str(tmp_path / "report.json") + ": expected a folder" in capsys.readouterr().err


def test_data_command(tmp_path, capsys):
    from groundseg.cli import main
    from groundseg.datasets.refer import load_refer

    assert main(["data", "shapes", "--out", str(tmp_path / "d"), "--seed", "4", "--images", "10"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 10
    refer = load_refer(tmp_path / "d", "shapes", "unc")
    assert len(refer.images) == 10 and (tmp_path / "d" / "images").is_dir()
    assert main(["data", "shapes", "--out", str(tmp_path / "e"), "--images", "-1"]) == 2
    assert not (tmp_path / "e").exists()
