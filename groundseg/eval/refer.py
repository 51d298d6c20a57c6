"""Referring segmentation and box grounding on REFER-format datasets (RefCOCO/+/g, RefCLEF, the shapes world).

Segmentation (:func:`evaluate_refer`) runs the loop of :mod:`groundseg.eval.runner` over every sentence of a split,
grouped by image: ``protocol="teacher-forced"`` is LISA's evaluation (the answer fixed to ``"[SEG]."``, the question
``"What is {sentence} in this image? Please output segmentation mask."`` with REFER's normalised ``sent``);
``"generate"`` lets the model answer. Multi-target refs (``ann_id`` a list, gRefCOCO style) are always generated and
scored on the union of the predicted masks. With ``out`` the run writes ``predictions.jsonl``, ``report.json`` and
``iou_hist.png`` (:mod:`groundseg.eval.report`) and can be resumed. :func:`score_refer_predictions` scores a
predictions file without a model.

Boxes (:func:`evaluate_boxes`, ``groundseg eval rec``): for each single-target sentence the question
``"Where is {sentence}? Answer with a box."`` is generated and the first ``<box>`` of the answer is compared with the
ground-truth box of the referred object, the annotation's COCO ``bbox`` (the REC protocol; the mask's extent only
for an annotation without one): Acc@0.5 (IoU >= 0.5) and mean IoU. The run shards, logs, resumes and reports like a
segmentation run; :func:`score_box_predictions` scores a file of boxes without a model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import InputError, mask_to_bbox
from .metrics import BoxMeter
from .report import build_report, dist_info, split_count_warning, write_scored_outputs
from .runner import (MULTI_QUESTION, Clock, Expression, check_run_args, check_unique, expression_record,
                     match_predictions, protocol_name, run_and_report, run_groups, score_predictions)

SEG_QUESTION = "What is {} in this image? Please output segmentation mask."
BOX_QUESTION = "Where is {}? Answer with a box."

__all__ = ["SEG_QUESTION", "MULTI_QUESTION", "BOX_QUESTION", "ReferReport", "evaluate_refer",
           "score_refer_predictions", "evaluate_boxes", "score_box_predictions"]


@dataclass
class ReferReport:
    """What an evaluation measured: ``metrics`` per group ("all" and each expression kind), one record per
    expression (image, sentence, kind, IoU), and ``report``, the content of ``report.json``."""

    dataset: str
    split: str
    mode: str
    metrics: dict[str, dict[str, float]]
    records: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "mode": self.mode, "metrics": self.metrics,
                "records": self.records}


def _load_split(data_root: str, dataset: str | None, split_by: str | None, split: str, image_dir: str | None,
                limit: int | None, single_only: bool, need_images: bool = True):
    """(refer, image folder, {image_id: [ReferSample]} of the first ``limit`` images, sentences in the split)."""
    from ..datasets.refer import load_refer

    refer = load_refer(data_root, dataset, split_by)
    samples = [s for s in refer.sentences(split) if not single_only or len(s.ann_ids) == 1]
    if not samples:
        what = "single-target sentences" if single_only else "sentences"
        raise InputError(f"{refer.source}: no {what} in split {split!r} (splits: {', '.join(refer.splits)})")
    images = Path(image_dir) if image_dir else _default_images(Path(data_root), samples[0].file_name)
    if need_images and not images.is_dir():
        raise InputError(f"image folder not found: {images} (pass --image-dir)")
    by_image: dict[int, list] = {}
    for s in samples:
        by_image.setdefault(s.image_id, []).append(s)
    keep = list(by_image)[:limit] if limit else list(by_image)
    return refer, images, {i: by_image[i] for i in keep}, samples


def _default_images(data_root: Path, file_name: str) -> Path:
    """``DATA_ROOT/images``, or REFER's own layout below it (``images/mscoco/images/train2014`` for RefCOCO/+/g,
    ``images/saiapr_tc-12`` for RefCLEF) where that is where the split's first image is."""
    base = data_root / "images"
    for folder in (base, base / "mscoco" / "images" / "train2014", base / "saiapr_tc-12"):
        if (folder / file_name).is_file():
            return folder
    return base


def _expressions(by_image: dict, images: Path, question: str = SEG_QUESTION) -> list[list[Expression]]:
    """One :class:`Expression` per sentence, grouped by image; the text is LISA's ``sent.strip().lower()``."""
    return [[Expression(sent_id=s.sent_id, image_id=s.image_id, ref_id=s.ref_id, text=s.sentence.strip().lower(),
                        kind=s.kind, question=question, image=images / s.file_name, multi=len(s.ann_ids) != 1)
             for s in group] for group in by_image.values()]


def _ground_truth(refer):
    @lru_cache(maxsize=256)
    def ref_mask(ref_id: int) -> np.ndarray:
        return refer.mask(refer.refs_by_id[ref_id])

    return lambda e: (ref_mask(e.ref_id), None)


def _split_by(refer, split_by: str | None) -> str | None:
    """``split_by`` as given, else read from the refs file found (``refs(unc).p`` -> ``"unc"``)."""
    return split_by or Path(refer.source).name.partition("(")[2].partition(")")[0] or None


def _warnings(dataset: str | None, split_by: str | None, refer, split: str, count: int, limit: int | None
              ) -> list[str]:
    if limit:
        return []
    warning = split_count_warning(dataset, split_by, split, count)
    if warning is None:
        return []
    if dist_info()[0] == 0:
        print(f"groundseg: warning: {warning}", file=sys.stderr)
    return [warning]


@torch.no_grad()
def _model_run_split(data_root, dataset, split_by, split, image_dir, limit, out, single_only: bool,
                     question: str = SEG_QUESTION):
    """What a model run over a REFER split needs: (name, refer, expression groups, split_by, count warnings)."""
    name = dataset or Path(data_root).name
    refer, images, by_image, samples = _load_split(data_root, dataset, split_by, split, image_dir, limit,
                                                   single_only=single_only)
    groups = _expressions(by_image, images, question)
    split_by = _split_by(refer, split_by)
    warnings = _warnings(name, split_by, refer, split, len(samples), limit)
    if out:
        check_unique(groups, refer.source)
    return name, refer, groups, split_by, warnings


def evaluate_refer(model, data_root: str, dataset: str | None = None, split_by: str | None = None,
                   split: str = "val", image_dir: str | None = None, mode: str | None = None,
                   chunk: int = 16, limit: int | None = None, progress: bool = True, *,
                   protocol: str | None = None, batch_size: int | None = None, out: str | None = None,
                   resume: bool = False, model_name: str | None = None) -> ReferReport:
    """cIoU / gIoU / Prec@X of every sentence of ``split``, overall and per expression kind.

    Args:
        protocol: ``"teacher-forced"`` (default, LISA's) or ``"generate"``; ``mode`` ``"teacher"``/``"chat"`` is
            the older spelling of the same choice.
        batch_size: expressions per forward (``chunk`` is the older name); 16 by default.
        limit: the first N images only (no split-size warning then).
        out: a folder for ``predictions.jsonl``, ``report.json`` and ``iou_hist.png``.
        resume: continue the run in ``out``: sentences already in its ``predictions.jsonl`` are scored from there
            and not predicted again; the final report equals an uninterrupted run's (but for ``seconds``).
        model_name: what ``report.json`` calls the model.
    """
    clock = Clock()
    protocol = protocol_name(protocol, mode)
    batch_size = batch_size or chunk
    check_run_args(batch_size, resume, out)
    name, refer, groups, split_by, warnings = _model_run_split(data_root, dataset, split_by, split, image_dir, limit,
                                                               out, single_only=False)
    run = {"task": "refer", "dataset": name, "split_by": split_by, "split": split, "protocol": protocol,
           "model": model_name, "limit": limit}
    meter, records, report = run_and_report(model, groups, _ground_truth(refer), protocol, batch_size, out, run,
                                            resume, progress, f"eval {name} {split}", clock, dataset=name,
                                            split_by=split_by, split=split, model=model_name, warnings=warnings)
    return ReferReport(name, split, protocol, meter.summary(), records, report)


def score_refer_predictions(predictions: str, data_root: str, dataset: str | None = None,
                            split_by: str | None = None, split: str = "val", limit: int | None = None,
                            out: str | None = None) -> ReferReport:
    """Score a predictions file (JSONL, or a JSON list, of ``{"sent_id", "segmentation": RLE}``) on ``split``
    without a model. Sentences without a prediction count as empty masks; ``report["missing"]`` says how many.
    An unknown sent_id, a malformed RLE or a mask of the wrong size is an :class:`InputError` naming the line."""
    clock = Clock()
    name = dataset or Path(data_root).name
    refer, images, by_image, samples = _load_split(data_root, dataset, split_by, split, None, limit,
                                                   single_only=False, need_images=False)
    groups = _expressions(by_image, images)
    check_unique(groups, refer.source)
    split_by = _split_by(refer, split_by)
    warnings = _warnings(name, split_by, refer, split, len(samples), limit)
    meter, records, missing = score_predictions(predictions, groups, _ground_truth(refer),
                                                frozenset(s.sent_id for s in samples), f"{name} {split}")
    report = build_report(meter, dataset=name, split_by=split_by, split=split, model=None,
                          protocol="predictions", num_images=len(groups), seconds=clock(), warnings=warnings,
                          predictions=str(predictions), missing=missing)
    write_scored_outputs(out, report, meter)
    return ReferReport(name, split, "predictions", meter.summary(), records, report)


@torch.no_grad()
def evaluate_boxes(model, data_root: str, dataset: str | None = None, split_by: str | None = None,
                   split: str = "val", image_dir: str | None = None, chunk: int = 16, limit: int | None = None,
                   progress: bool = True, *, batch_size: int | None = None, out: str | None = None,
                   resume: bool = False, model_name: str | None = None) -> ReferReport:
    """Box grounding (REC) Acc@0.5 and mean IoU of the single-target sentences of ``split``, overall and per kind.

    With ``out``, ``predictions.jsonl`` gets ``sent_id``, ``ref_id``, ``image_id``, ``box`` (xyxy pixels, null
    when the answer holds none) and ``iou`` per sentence, and ``report.json`` the metrics (``accuracy@0.5``,
    ``mIoU``, ``num_expressions``, ``num_images``, ``by_kind``, ...); ``resume`` continues such a run. Under
    ``accelerate launch`` the images are shared out among the processes as in :func:`evaluate_refer`.
    """
    clock = Clock()
    batch_size = batch_size or chunk
    check_run_args(batch_size, resume, out)
    name, refer, groups, split_by, warnings = _model_run_split(data_root, dataset, split_by, split, image_dir, limit,
                                                               out, single_only=True, question=BOX_QUESTION)
    run = {"task": "rec", "dataset": name, "split_by": split_by, "split": split, "protocol": "generate",
           "model": model_name, "limit": limit}
    meter, records, report = run_and_report(model, groups, _box_truth(refer), "generate", batch_size, out, run,
                                            resume, progress, f"eval rec {name} {split}", clock, loop=_run_boxes,
                                            build=_box_report, dataset=name, split_by=split_by, split=split,
                                            model=model_name, warnings=warnings)
    return ReferReport(name, split, "box", meter.summary(), records, report)


def score_box_predictions(predictions: str, data_root: str, dataset: str | None = None,
                          split_by: str | None = None, split: str = "val", limit: int | None = None,
                          out: str | None = None) -> ReferReport:
    """Score a file of boxes (JSONL, or a JSON list, of ``{"sent_id", "box": [x1, y1, x2, y2]}`` in pixels) on the
    single-target sentences of ``split`` without a model. A sentence absent from the file, or whose ``box`` is null
    or absent, has no box: IoU 0, counted in ``report["missing"]``. An unknown or repeated sent_id, or a box that is
    not four finite numbers with x1 <= x2, y1 <= y2 inside the image, is an :class:`InputError` naming the line."""
    clock = Clock()
    name = dataset or Path(data_root).name
    refer, images, by_image, samples = _load_split(data_root, dataset, split_by, split, None, limit,
                                                   single_only=True, need_images=False)
    groups = _expressions(by_image, images, BOX_QUESTION)
    check_unique(groups, refer.source)
    split_by = _split_by(refer, split_by)
    warnings = _warnings(name, split_by, refer, split, len(samples), limit)
    truth = _box_truth(refer)
    given = match_predictions(predictions, groups,
                              lambda e, entry, loc: _pred_box(entry.get("box"), truth(e)[1], loc),
                              frozenset(s.sent_id for s in refer.sentences(split)), f"{name} {split}",
                              keys=("sent_id",))
    meter, records, missing = BoxMeter(), [], 0
    for e in (e for group in groups for e in group):
        box = given.get(e.sent_id)
        missing += box is None
        records.append(expression_record(e, meter.add(box, truth(e)[0], e.kind)))
    report = _box_report(meter, dataset=name, split_by=split_by, split=split, model=None, protocol="predictions",
                         num_images=len(groups), seconds=clock(), warnings=warnings, predictions=str(predictions),
                         missing=missing)
    write_scored_outputs(out, report, meter)
    return ReferReport(name, split, "predictions", meter.summary(), records, report)


def _run_boxes(model, groups: list[list[Expression]], truth, protocol: str, batch_size: int, log=None,
               progress: bool = True, desc: str = "eval") -> tuple[BoxMeter, list[dict]]:
    """:func:`groundseg.eval.runner.run_masks` for boxes (the ``loop`` of ``run_and_report``): each question is
    generated (``protocol`` is always ``"generate"``) and the first ``<box>`` of the answer is the prediction;
    logged predictions are scored from their ``box``."""
    from ..grounding.tokens import parse_boxes

    meter = BoxMeter()

    def logged(e: Expression, rec: dict) -> float:
        gt, size = truth(e)
        return meter.add(_pred_box(rec.get("box"), size, f"{log.path} sent_id {e.sent_id}"), gt, e.kind)

    def fresh(rgb: np.ndarray, todo: list[Expression]):
        h, w = rgb.shape[:2]
        for i in range(0, len(todo), batch_size):
            part = todo[i:i + batch_size]
            results = model.segment(rgb, [e.question.format(e.text) for e in part], max_new_tokens=48)
            for e, res in zip(part, results):
                boxes = parse_boxes(res.text, (h, w))
                box = [float(v) for v in boxes[0].box] if boxes else None
                yield e, meter.add(box, truth(e)[0], e.kind), {"box": box}

    return run_groups(groups, meter, logged, fresh, log, progress, desc)


def _box_report(meter: BoxMeter, **info: Any) -> dict[str, Any]:
    """``report.json`` of a box run: ``accuracy@0.5``, ``mIoU``, ``num_expressions``, then ``info``, then the same
    metrics per kind under ``by_kind`` (the layout of :func:`groundseg.eval.report.build_report`)."""
    def row(m: dict) -> dict[str, Any]:
        out = {"accuracy@0.5": m["Acc@0.5"], "mIoU": m["mIoU"], "num_expressions": m["n"]}
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}  # NaN is not JSON

    summary = meter.summary()
    return {**row(summary["all"]), **info, "by_kind": {g: row(m) for g, m in summary.items() if g != "all"}}


def _box_truth(refer):
    """expression -> (ground-truth xyxy box, (image height, image width)), for single-target refs."""
    @lru_cache(maxsize=4096)
    def truth(ref_id: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
        ref = refer.refs_by_id[ref_id]
        image = refer.image_of(ref)
        return _ann_box(refer, refer.ann_ids(ref)[0]), (int(image["height"]), int(image["width"]))

    return lambda e: truth(e.ref_id)


def _ann_box(refer, ann_id: int) -> tuple[float, float, float, float]:
    """An annotation's COCO ``bbox`` ``[x, y, w, h]`` as xyxy; its mask's extent when it has no ``bbox``."""
    bbox = refer.anns.get(ann_id, {}).get("bbox")
    if bbox is None:
        return _xyxy(refer.ann_mask(ann_id))  # (names an absent annotation)
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_finite(v) for v in bbox)
            and bbox[2] >= 0 and bbox[3] >= 0):
        raise InputError(f"{refer.source}: annotation {ann_id} has bbox {bbox!r}: expected [x, y, w, h] "
                         "with w, h >= 0")
    x, y, w, h = map(float, bbox)
    return x, y, x + w, y + h


def _pred_box(box: Any, size: tuple[int, int], where: str) -> list[float] | None:
    """A predicted or logged box checked as pixel xyxy inside an image of ``size`` (H, W); None stays None."""
    if box is None:
        return None
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_finite(v) for v in box)):
        raise InputError(f"{where}: box {box!r}: expected [x1, y1, x2, y2] (four numbers, pixels) or null")
    x1, y1, x2, y2 = map(float, box)
    if x1 > x2 or y1 > y2:
        raise InputError(f"{where}: box {box!r}: expected x1 <= x2 and y1 <= y2 (corners, not [x, y, w, h])")
    h, w = size
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise InputError(f"{where}: box {box!r} lies outside the image ({w}x{h} pixels): expected pixel "
                         "coordinates")
    return [x1, y1, x2, y2]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _xyxy(mask: np.ndarray) -> tuple[float, float, float, float]:
    x, y, bw, bh = mask_to_bbox(mask)
    return float(x), float(y), float(x + bw), float(y + bh)
