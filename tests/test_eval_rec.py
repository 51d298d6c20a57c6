"""`groundseg eval rec` (box grounding): the ground-truth box is the annotation's COCO bbox (the mask's extent only
without one), scoring a file of boxes (hand-computed Acc@0.5 / mIoU / missing, and its one-line errors), the
report's shape, and two processes giving the report of one (after a kill in one process)."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from groundseg.cli import main
from groundseg.io import mask_to_rle
from test_eval_outputs import BoxStub, _lines, _report, refer, shapes_dir  # noqa: F401 (fixtures)

REPORT_KEYS = {"accuracy@0.5", "mIoU", "num_expressions", "num_images", "dataset", "split", "split_by", "model",
               "protocol", "seconds", "by_kind", "warnings"}


@pytest.fixture(scope="module")
def val(refer):
    """The single-target val sentences of the shapes world with their COCO bbox as xyxy, in split order."""
    out = []
    for s in refer.sentences("val"):
        if len(s.ann_ids) == 1:
            x, y, w, h = refer.anns[s.ann_ids[0]]["bbox"]
            out.append((s, [float(x), float(y), float(x + w), float(y + h)]))
    return out


@pytest.fixture(scope="module")
def stub_run(shapes_dir, tmp_path_factory):
    from groundseg.eval.refer import evaluate_boxes

    out = tmp_path_factory.mktemp("rec") / "run"
    result = evaluate_boxes(BoxStub(), str(shapes_dir), "shapes", "unc", split="val", progress=False, batch_size=2,
                            model_name="stub", out=str(out))
    return out, result


def _quarter_iou(box, h, w):
    """IoU of the stub's answer (the top-left quarter of an h x w image) with ``box``, by hand."""
    x1, y1, x2, y2 = box
    iw, ih = max(0.0, min(x2, w / 2) - x1), max(0.0, min(y2, h / 2) - y1)
    inter = iw * ih
    return inter / ((x2 - x1) * (y2 - y1) + w / 2 * h / 2 - inter)


def test_rec_report_shape_and_values(stub_run, val):
    out, result = stub_run
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS | {"resumed_expressions"}
    assert (report["dataset"], report["split"], report["split_by"], report["model"], report["protocol"]) == \
        ("shapes", "val", "unc", "stub", "generate")
    ious = [_quarter_iou(box, s.height, s.width) for s, box in val]
    assert report["num_expressions"] == len(val) and report["num_images"] == len({s.image_id for s, _ in val})
    assert report["mIoU"] == pytest.approx(np.mean(ious))
    assert report["accuracy@0.5"] == pytest.approx(np.mean(np.asarray(ious) >= 0.5))
    assert 0 < report["mIoU"] < 1
    kinds = {s.kind for s, _ in val}
    assert set(report["by_kind"]) == kinds and len(kinds) > 1
    for kind, row in report["by_kind"].items():
        mine = [iou for (s, _), iou in zip(val, ious) if s.kind == kind]
        assert row["num_expressions"] == len(mine) and row["mIoU"] == pytest.approx(np.mean(mine))
    lines = _lines(out)
    assert [r["sent_id"] for r in lines] == [s.sent_id for s, _ in val]
    assert [r["iou"] for r in lines] == pytest.approx(ious)
    assert cv2.imread(str(out / "iou_hist.png")) is not None
    assert [r["iou"] for r in result.records] == pytest.approx(ious)


def test_scoring_the_runs_own_file_gives_its_report(stub_run, shapes_dir, tmp_path, capsys):
    out, _ = stub_run
    scored = tmp_path / "scored"
    assert main(["eval", "rec", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "val",
                 "--predictions", str(out / "predictions.jsonl"), "--out", str(scored)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["group", "Acc@0.5", "mIoU", "n"]
    a, b = _report(scored), _report(out)
    assert {k: a[k] for k in ("accuracy@0.5", "mIoU", "num_expressions", "num_images", "by_kind")} == \
        {k: b[k] for k in ("accuracy@0.5", "mIoU", "num_expressions", "num_images", "by_kind")}
    assert a["missing"] == 0 and a["protocol"] == "predictions" and a["model"] is None
    assert set(json.loads((scored / "report.json").read_text())) == REPORT_KEYS | {"missing", "predictions"}
    assert sorted(p.name for p in scored.iterdir()) == ["iou_hist.png", "report.json"]


def test_scoring_hand_made_boxes(val, shapes_dir, tmp_path, capsys):
    """The exact box (IoU 1), its left half (IoU exactly 0.5, which counts), a null box and a sentence without a
    box key (both missing, IoU 0); every other sentence is absent (missing too)."""
    (s0, b0), (s1, b1), (s2, _), (s3, _) = val[:4]
    half = [b1[0], b1[1], (b1[0] + b1[2]) / 2, b1[3]]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps([{"sent_id": s0.sent_id, "box": b0}, {"sent_id": s1.sent_id, "box": half},
                                {"sent_id": s2.sent_id, "box": None}, {"sent_id": s3.sent_id}]))
    assert main(["eval", "boxes", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "val",
                 "--predictions", str(path), "--out", str(tmp_path / "out")]) == 0
    n = len(val)
    assert f"{n - 2} of {n} sentences had no box (scored as IoU 0)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["missing"] == n - 2 and report["num_expressions"] == n
    assert report["accuracy@0.5"] == pytest.approx(2 / n)
    assert report["mIoU"] == pytest.approx(1.5 / n)


def test_predictions_file_errors(val, shapes_dir, tmp_path, capsys):
    args = ["eval", "rec", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "val"]
    s, box = val[0]
    sid = s.sent_id

    def check(entries, message, raw=None):
        path = tmp_path / "p.jsonl"
        path.write_text(raw if raw is not None else "".join(json.dumps(e) + "\n" for e in entries))
        assert main(args + ["--predictions", str(path)]) == 2
        assert capsys.readouterr().err == f"groundseg: error: {message.format(path=path)}\n"

    check([{"sent_id": 10 ** 9, "box": box}], "{path} line 1: sent_id 1000000000 is not a sentence of shapes val")
    check([{"sent_id": sid, "box": box}, {"sent_id": sid, "box": None}], f"{{path}} line 2: sent_id {sid} appears twice")
    check([{"sent_id": sid, "box": [1, 2, 3]}],
          "{path} line 1: box [1, 2, 3]: expected [x1, y1, x2, y2] (four numbers, pixels) or null")
    check([{"sent_id": sid, "box": "1,2,3,4"}],
          "{path} line 1: box '1,2,3,4': expected [x1, y1, x2, y2] (four numbers, pixels) or null")
    check([{"sent_id": sid, "box": [1, 2, True, 4]}],
          "{path} line 1: box [1, 2, True, 4]: expected [x1, y1, x2, y2] (four numbers, pixels) or null")
    check(None, "{path} line 1: box [1, 2, nan, 4]: expected [x1, y1, x2, y2] (four numbers, pixels) or null",
          raw=f'{{"sent_id": {sid}, "box": [1, 2, NaN, 4]}}\n')
    check([{"sent_id": sid, "box": [10, 10, 5, 20]}],
          "{path} line 1: box [10, 10, 5, 20]: expected x1 <= x2 and y1 <= y2 (corners, not [x, y, w, h])")
    check([{"sent_id": sid, "box": [0, 0, s.width + 1, 4]}],
          f"{{path}} line 1: box [0, 0, {s.width + 1}, 4] lies outside the image ({s.width}x{s.height} pixels): "
          "expected pixel coordinates")
    check([{"sent_id": [sid], "box": box}], f"{{path}} line 1: sent_id [{sid}]: expected a sentence id of shapes val")
    check([{"box": box}], "{path} line 1: expected an object with 'sent_id'")
    check(None, "{path} line 2 is not valid JSON (Expecting value)", raw=json.dumps({"sent_id": sid}) + "\nnope\n")
    assert main(args + ["--predictions", str(tmp_path / "absent.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"sent_id": sid, "box": box}) + "\n")
    assert main(args + ["--predictions", str(good), "--model", "lisa-tiny"]) == 2
    assert "without a model" in capsys.readouterr().err


def _hand_made(root, bad_bbox: bool = False):
    """One 20x20 image, two single-target refs: annotation 1's mask covers rows 3..7 and columns 4..11 (extent xyxy
    [4, 3, 12, 8]) but its COCO bbox is the whole image; annotation 2 has the same mask and no bbox."""
    folder = root / "hand"
    folder.mkdir(parents=True)
    (root / "images").mkdir()
    cv2.imwrite(str(root / "images" / "a.png"), np.zeros((20, 20, 3), np.uint8))
    mask = np.zeros((20, 20), bool)
    mask[3:8, 4:12] = True
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": mask_to_rle(mask), "area": 40,
             "bbox": [0, 0, 20, 20], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": mask_to_rle(mask), "area": 40, "iscrowd": 0}]
    if bad_bbox:
        anns[0]["bbox"] = [0, 0, 20]
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 20}], "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}]}))
    refs = [{"ref_id": r, "ann_id": r, "image_id": 7, "split": "val", "sent_ids": [10 * r], "category_id": 1,
             "file_name": f"a_{r}.png", "sentences": [{"sent_id": 10 * r, "sent": f"thing {r}", "raw": f"thing {r}",
                                                      "tokens": ["thing", str(r)]}]} for r in (1, 2)]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


class WholeImage:
    """Answers every box question with the whole image."""

    def segment(self, image, prompts, max_new_tokens=0):
        from groundseg.result import Result

        return [Result(text="<ref>it</ref><box>(0,0),(1000,1000)</box>", masks=np.zeros((0, 20, 20), bool),
                       scores=np.zeros(0), boxes=np.zeros((0, 4), np.float32), phrases=[], sources=[])
                for _ in prompts]


def test_ground_truth_is_the_coco_bbox_not_the_mask_extent(tmp_path):
    from groundseg.eval.refer import evaluate_boxes, score_box_predictions
    from groundseg.io import InputError

    root = _hand_made(tmp_path / "ok")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"sent_id": 10, "box": [4, 3, 12, 8]}) + "\n"    # the mask extent of annotation 1
                    + json.dumps({"sent_id": 20, "box": [4, 3, 12, 8]}) + "\n")  # and of annotation 2 (no bbox)
    scored = score_box_predictions(str(path), str(root), "hand", split="val")
    assert [r["iou"] for r in scored.records] == pytest.approx([40 / 400, 1.0])
    # A model answering the whole image hits annotation 1's bbox exactly and annotation 2's extent at 40/400.
    run = evaluate_boxes(WholeImage(), str(root), "hand", split="val", progress=False)
    assert [r["iou"] for r in run.records] == pytest.approx([1.0, 40 / 400])
    assert run.report["accuracy@0.5"] == 0.5 and run.report["mIoU"] == pytest.approx(1.1 / 2)

    bad = _hand_made(tmp_path / "bad", bad_bbox=True)
    with pytest.raises(InputError, match=r"annotation 1 has bbox \[0, 0, 20\]: expected \[x, y, w, h\] with w, h "
                                         r">= 0"):
        score_box_predictions(str(path), str(bad), "hand", split="val")


def test_resume_refuses_a_malformed_logged_box(shapes_dir, tmp_path, val):
    from groundseg.eval.refer import evaluate_boxes
    from groundseg.io import InputError

    common = dict(data_root=str(shapes_dir), dataset="shapes", split="val", progress=False, model_name="stub")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        evaluate_boxes(BoxStub(die_after=1), out=str(out), **common)
    sid = val[0][0].sent_id
    (out / "predictions.jsonl").write_text(json.dumps({"sent_id": sid, "box": [1, 2], "iou": 0}) + "\n")
    with pytest.raises(InputError, match=rf"predictions.jsonl sent_id {sid}: box \[1, 2\]: expected"):
        evaluate_boxes(BoxStub(), out=str(out), resume=True, **common)


def _worker(rank: int, world: int, init_file: str, data_root: str, out: str) -> None:
    from groundseg.eval.refer import evaluate_boxes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        asked = BoxStub()
        result = evaluate_boxes(asked, data_root, "shapes", "unc", split="val", progress=False, batch_size=2,
                                model_name="stub", out=out, resume=True)
        with open(f"{out}/result.rank{rank}.json", "w") as f:
            json.dump({"metrics": result.metrics, "records": result.records, "asked": asked.asked}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_report(stub_run, shapes_dir, tmp_path):
    """A rec run killed in one process and finished by two equals an uninterrupted single-process run."""
    from groundseg.eval.refer import evaluate_boxes

    one, full = stub_run
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        evaluate_boxes(BoxStub(die_after=2), str(shapes_dir), "shapes", "unc", split="val", progress=False,
                       batch_size=2, model_name="stub", out=str(cut))
    before = len(_lines(cut))
    assert 0 < before < full.report["num_expressions"]
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(shapes_dir), str(cut)), nprocs=2)
    assert _report(cut) == _report(one)
    assert json.loads((cut / "report.json").read_text())["resumed_expressions"] == before
    results = [json.loads((cut / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:  # every process returns the merged metrics and records, in split order
        assert r["metrics"] == json.loads(json.dumps(full.metrics))
        assert r["records"] == json.loads(json.dumps(full.records))
    # Each process asked only about its own images, together exactly the sentences not logged before the kill.
    assert results[0]["asked"] > 0 and results[1]["asked"] > 0
    assert results[0]["asked"] + results[1]["asked"] == full.report["num_expressions"] - before
    ids = [r["sent_id"] for r in _lines(cut)]
    assert sorted(ids) == sorted(r["sent_id"] for r in full.records) and len(set(ids)) == len(ids)
