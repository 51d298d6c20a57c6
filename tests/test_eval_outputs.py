"""`groundseg eval refer` run outputs on a shapes split written to disk: predictions.jsonl, report.json,
iou_hist.png, kill-and-resume equality, scoring a predictions file (and its errors), protocol aliases and the
published split-count warning."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from groundseg.cli import main
from groundseg.io import mask_to_rle, rle_to_mask

REPORT_KEYS = {"cIoU", "gIoU", "precision@0.5", "precision@0.6", "precision@0.7", "precision@0.8", "precision@0.9",
               "num_expressions", "num_images", "dataset", "split", "model", "protocol", "seconds", "by_kind"}


@pytest.fixture(scope="module")
def shapes_dir(shapes_folder):
    return shapes_folder(seed=5, images=40)


@pytest.fixture(scope="module")
def refer(shapes_dir):
    from groundseg.datasets.refer import load_refer

    return load_refer(shapes_dir, "shapes", "unc")


@pytest.fixture(scope="module")
def tiny_run(shapes_dir, tmp_path_factory):
    """A full `eval refer` of the tiny preset on the test split, through the command."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "test",
                 "--model", "lisa-tiny", "--batch-size", "3", "--out", str(out)]) == 0
    return out


def _report(folder):
    r = json.loads((folder / "report.json").read_text())
    return {k: v for k, v in r.items() if k not in ("seconds", "resumed_expressions")}


def _lines(folder):
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]


def test_tiny_preset_run_writes_its_outputs(tiny_run, refer):
    report = json.loads((tiny_run / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    samples = list(refer.sentences("test"))
    assert report["num_expressions"] == len(samples)
    assert report["num_images"] == len({s.image_id for s in samples})
    assert (report["dataset"], report["split"], report["model"], report["protocol"]) == \
        ("shapes", "test", "lisa-tiny", "teacher-forced")
    assert set(report["by_kind"]) == {s.kind for s in samples}
    assert sum(r["num_expressions"] for r in report["by_kind"].values()) == len(samples)

    # One line per sentence, in split order, whose RLE and IoU agree with the ground truth and the report.
    lines = _lines(tiny_run)
    assert [r["sent_id"] for r in lines] == [s.sent_id for s in samples]
    inter = union = 0
    ious = []
    for rec, s in zip(lines, samples):
        assert set(rec) == {"sent_id", "ref_id", "image_id", "segmentation", "iou"}
        assert (rec["ref_id"], rec["image_id"]) == (s.ref_id, s.image_id)
        pred, gt = rle_to_mask(rec["segmentation"]), refer.mask(refer.refs_by_id[s.ref_id])
        i, u = int((pred & gt).sum()), int((pred | gt).sum())
        inter, union = inter + i, union + u
        ious.append(i / u if u else 1.0)
        assert rec["iou"] == pytest.approx(ious[-1])
    assert report["cIoU"] == pytest.approx(inter / union)
    assert report["gIoU"] == pytest.approx(np.mean(ious))
    assert report["precision@0.5"] == pytest.approx(np.mean(np.asarray(ious) >= 0.5))

    hist = cv2.imread(str(tiny_run / "iou_hist.png"))
    assert hist is not None and hist.shape[2] == 3 and (hist < 250).any()
    assert sorted(p.name for p in tiny_run.iterdir()) == ["iou_hist.png", "predictions.jsonl", "report.json",
                                                         "run.json"]  # no temp files left behind


def test_resume_after_a_kill_gives_the_same_report(tiny_run, shapes_dir, tmp_path, capsys):
    """Keep the lines of the first images plus a torn half line, as a kill would leave them, and resume."""
    lines = (tiny_run / "predictions.jsonl").read_text().splitlines(keepends=True)
    first_images = {json.loads(x)["image_id"] for x in lines[:1]}
    keep = [x for x in lines if json.loads(x)["image_id"] in first_images]
    assert 0 < len(keep) < len(lines)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run / "run.json", out / "run.json")
    torn = lines[len(keep)][: len(lines[len(keep)]) // 2]
    (out / "predictions.jsonl").write_text("".join(keep) + torn)
    args = ["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "test",
            "--model", "lisa-tiny", "--out", str(out)]
    assert main(args) == 2  # an existing run is never appended to by accident
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--batch-size", "5"]) == 0
    assert _report(out) == _report(tiny_run)
    assert json.loads((out / "report.json").read_text())["resumed_expressions"] == len(keep)
    assert sorted(map(json.dumps, _lines(out))) == sorted(map(json.dumps, _lines(tiny_run)))
    # A different run in the same folder is refused.
    assert main(args + ["--resume", "--protocol", "generate"]) == 2
    assert "holds a different run (protocol: 'teacher-forced' there, 'generate' now)" in capsys.readouterr().err
    # ... and a different model is told before any model is loaded: this name does not even exist
    other = [a if a != "lisa-tiny" else "no-such-model" for a in args]
    assert main(other + ["--resume"]) == 2
    assert "holds a different run (model: 'lisa-tiny' there, 'no-such-model' now)" in capsys.readouterr().err


class Stub:
    """A deterministic model (a box in the top-left corner whose size depends on the sentence) that can be made to
    die after ``die_after`` forwards, as a killed process would."""

    def __init__(self, die_after: int | None = None) -> None:
        self.calls, self.die_after, self.seen = 0, die_after, []

    def segment_teacher_forced(self, image, expressions, question=None):
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.seen += list(expressions)
        h, w = np.asarray(image).shape[:2]
        out = -torch.ones(len(expressions), h, w)
        for k, e in enumerate(expressions):
            n = 8 + len(e) % 40
            out[k, :n, :n] = 1
        return out

    def segment(self, image, prompts, max_new_tokens=0):
        from groundseg.result import Result

        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.seen += list(prompts)
        h, w = np.asarray(image).shape[:2]
        return [Result(text="[SEG]", masks=np.ones((1, h, w), bool), scores=np.ones(1),
                       boxes=np.array([[0, 0, w, h]], np.float32), phrases=[None], sources=["seg"])
                for _ in prompts]


def test_killed_mid_image_then_resumed_predicts_each_sentence_once(shapes_dir, tmp_path):
    from groundseg.eval.refer import evaluate_refer

    common = dict(data_root=str(shapes_dir), dataset="shapes", split_by="unc", split="val", progress=False,
                  batch_size=2, model_name="stub")
    full = evaluate_refer(Stub(), out=str(tmp_path / "full"), **common)
    dying = Stub(die_after=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate_refer(dying, out=str(tmp_path / "cut"), **common)
    written = _lines(tmp_path / "cut")
    assert 0 < len(written) < full.report["num_expressions"]
    assert not (tmp_path / "cut" / "report.json").exists()
    again = Stub()
    resumed = evaluate_refer(again, out=str(tmp_path / "cut"), resume=True, **common)
    assert _report(tmp_path / "cut") == _report(tmp_path / "full")
    assert resumed.metrics == full.metrics
    # Every sentence predicted before the kill was logged, and only the others went through the model again.
    assert len(dying.seen) == len(written)
    assert len(again.seen) == full.report["num_expressions"] - len(written)
    sent_ids = [r["sent_id"] for r in _lines(tmp_path / "cut")]
    assert sorted(sent_ids) == sorted(r["sent_id"] for r in full.records) and len(set(sent_ids)) == len(sent_ids)


def test_predictions_file_round_trip_and_missing(tiny_run, shapes_dir, tmp_path, capsys):
    args = ["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "test"]
    out = tmp_path / "scored"
    assert main(args + ["--predictions", str(tiny_run / "predictions.jsonl"), "--out", str(out)]) == 0
    capsys.readouterr()
    scored, run = _report(out), _report(tiny_run)
    for k in ("cIoU", "gIoU", "precision@0.5", "precision@0.9", "num_expressions", "num_images", "by_kind"):
        assert scored[k] == run[k]
    assert scored["missing"] == 0 and scored["protocol"] == "predictions" and scored["model"] is None
    assert (out / "iou_hist.png").is_file() and not (out / "predictions.jsonl").exists()

    # A JSON list with only half the sentences: the rest are empty masks.
    lines = _lines(tiny_run)
    half = [{"sent_id": r["sent_id"], "segmentation": r["segmentation"]} for r in lines[::2]]
    path = tmp_path / "half.json"
    path.write_text(json.dumps(half))
    assert main(args + ["--predictions", str(path), "--out", str(tmp_path / "half")]) == 0
    assert f"{len(lines) - len(half)} of {len(lines)} sentences had no prediction" in capsys.readouterr().out
    report = json.loads((tmp_path / "half" / "report.json").read_text())
    assert report["missing"] == len(lines) - len(half)
    # every sentence of the shapes world has a target, so an empty prediction scores 0
    assert report["gIoU"] == pytest.approx(sum(r["iou"] for r in lines[::2]) / len(lines))


def test_predictions_file_errors(tiny_run, shapes_dir, tmp_path, capsys):
    args = ["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--split", "test"]
    rec = _lines(tiny_run)[0]
    h, w = rle_to_mask(rec["segmentation"]).shape

    def check(entries, message, raw=None):
        path = tmp_path / "p.jsonl"
        path.write_text(raw if raw is not None else "".join(json.dumps(e) + "\n" for e in entries))
        assert main(args + ["--predictions", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"groundseg: error: {message.format(path=path)}\n"

    check([{"sent_id": 10 ** 9, "segmentation": rec["segmentation"]}],
          "{path} line 1: sent_id 1000000000 is not a sentence of shapes test")
    check([{"sent_id": rec["sent_id"], "segmentation": mask_to_rle(np.zeros((h + 1, w), bool))}],
          f"{{path}} line 1: segmentation size [{h + 1}, {w}] differs from the image size [{h}, {w}]")
    check([{"sent_id": rec["sent_id"], "segmentation": {"size": [h, w], "counts": [1, 2]}}],
          f"{{path}} line 1: RLE counts sum to 3, expected {h}*{w}={h * w}")
    check([{"sent_id": rec["sent_id"], "segmentation": {"counts": "xx"}}],
          "{path} line 1: RLE must be a dict with 'size' and 'counts', got {{'counts': 'xx'}}")
    check([rec, rec], f"{{path}} line 2: sent_id {rec['sent_id']} appears twice")
    check(None, "{path} line 2 is not valid JSON (Expecting value)", raw=json.dumps(rec) + "\nnot json\n")
    check([{"segmentation": rec["segmentation"]}], "{path} line 1: expected an object with 'sent_id' and "
                                                   "'segmentation'")
    assert main(args + ["--predictions", str(tmp_path / "absent.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(args + ["--predictions", str(tiny_run / "predictions.jsonl"), "--model", "lisa-tiny"]) == 2
    assert "without a model" in capsys.readouterr().err


def test_protocol_alias_and_conflicts(shapes_dir, tmp_path, capsys):
    from groundseg.eval.refer import evaluate_refer
    from groundseg.eval.runner import protocol_name

    assert protocol_name() == "teacher-forced"
    assert protocol_name(mode="chat") == "generate" and protocol_name(mode="teacher") == "teacher-forced"
    common = dict(data_root=str(shapes_dir), dataset="shapes", split="val", progress=False)
    assert evaluate_refer(Stub(), mode="chat", **common).metrics == \
        evaluate_refer(Stub(), protocol="generate", **common).metrics
    assert main(["eval", "refer", "--data-root", str(shapes_dir), "--dataset", "shapes", "--mode", "chat",
                 "--protocol", "teacher-forced"]) == 2
    assert "--mode chat means --protocol generate, which contradicts --protocol teacher-forced" in \
        capsys.readouterr().err
    assert main(["eval", "refer", "--data-root", str(shapes_dir), "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_published_split_count_warning(shapes_dir, tmp_path, capsys):
    """A REFER folder called refcoco whose unc val split is not RefCOCO's 10,834 sentences is flagged."""
    from groundseg.eval.refer import evaluate_refer, score_refer_predictions
    from groundseg.eval.report import split_count_warning

    root = tmp_path / "root"
    shutil.copytree(shapes_dir / "shapes", root / "refcoco")
    (root / "images").symlink_to(shapes_dir / "images")
    report = evaluate_refer(Stub(), str(root), "refcoco", "unc", split="val", progress=False).report
    n = report["num_expressions"]
    expected = (f"refcoco (unc) val has {n:,} expressions, the published count is 10,834: numbers are not "
                "comparable with the literature")
    assert report["warnings"] == [expected]
    assert capsys.readouterr().err == f"groundseg: warning: {expected}\n"
    assert evaluate_refer(Stub(), str(root), "refcoco", "unc", split="val", limit=2, progress=False
                          ).report["warnings"] == []  # a --limit run is not a full split
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    scored = score_refer_predictions(str(empty), str(root), "refcoco", split="val").report  # split_by from the file
    assert scored["warnings"] == [expected] and scored["missing"] == n
    # --data-root the dataset folder itself: the name and split_by come from the folder and its refs file
    scored = score_refer_predictions(str(empty), str(root / "refcoco"), split="val").report
    assert scored["warnings"] == [expected] and (scored["dataset"], scored["split_by"]) == ("refcoco", "unc")
    assert split_count_warning("refcoco", "unc", "testA", 5657) is None
    assert split_count_warning("refcocog", "umd", "test", 9) .endswith("(commonly cited, unverified): numbers are "
                                                                       "not comparable with the literature")
    assert split_count_warning("shapes", "unc", "val", 9) is None


class BoxStub:
    """Answers every box question with the top-left quarter of the image; dies after ``die_after`` calls."""

    def __init__(self, die_after: int | None = None) -> None:
        self.calls, self.die_after, self.asked = 0, die_after, 0

    def segment(self, image, prompts, max_new_tokens=0):
        from groundseg.grounding.tokens import format_ref_box
        from groundseg.result import Result

        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.asked += len(prompts)
        h, w = np.asarray(image).shape[:2]
        text = format_ref_box("it", (0, 0, w / 2, h / 2), (h, w))
        return [Result(text=text, masks=np.zeros((0, h, w), bool), scores=np.zeros(0),
                       boxes=np.zeros((0, 4), np.float32), phrases=[], sources=[]) for _ in prompts]


def test_rec_run_resumes_to_the_same_report(shapes_dir, tmp_path):
    from groundseg.eval.refer import evaluate_boxes

    common = dict(data_root=str(shapes_dir), dataset="shapes", split="val", progress=False, batch_size=2,
                  model_name="stub")
    full = evaluate_boxes(BoxStub(), out=str(tmp_path / "full"), **common)
    with pytest.raises(KeyboardInterrupt):
        evaluate_boxes(BoxStub(die_after=2), out=str(tmp_path / "cut"), **common)
    written = len(_lines(tmp_path / "cut"))
    again = BoxStub()
    evaluate_boxes(again, out=str(tmp_path / "cut"), resume=True, **common)
    assert again.asked == full.report["num_expressions"] - written > 0
    assert _report(tmp_path / "cut") == _report(tmp_path / "full")
    assert 0 < full.report["mIoU"] < 1 and set(_lines(tmp_path / "full")[0]) == {"sent_id", "ref_id", "image_id",
                                                                                  "box", "iou"}


def test_images_found_in_refers_own_layout(shapes_dir, tmp_path):
    """RefCOCO's images live in images/mscoco/images/train2014 below the data root; no --image-dir is needed."""
    from groundseg.eval.refer import evaluate_refer

    root = tmp_path / "root"
    shutil.copytree(shapes_dir / "shapes", root / "shapes")
    (root / "images" / "mscoco" / "images").mkdir(parents=True)
    (root / "images" / "mscoco" / "images" / "train2014").symlink_to(shapes_dir / "images")
    moved = evaluate_refer(Stub(), str(root), "shapes", split="val", progress=False)
    assert moved.metrics == evaluate_refer(Stub(), str(shapes_dir), "shapes", split="val", progress=False).metrics


def test_an_out_folder_with_predictions_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    # Loading a model can take minutes: a folder that already holds predictions (and no --resume) is refused
    # first, for image, captioning and video evaluation alike.
    from groundseg import cli, hub

    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.jsonl").write_text("")
    (tmp_path / "data").mkdir()

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hub, "load_model", no_load)
    for argv in (["eval", "refer", "--data-root", str(tmp_path / "data"), "--out", str(out)],
                 ["eval", "gcg", "--data-root", str(tmp_path / "data"), "--out", str(out)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "predictions.jsonl exists: pass --resume" in err and err.count("\n") == 1
