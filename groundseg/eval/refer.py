"""Referring segmentation and box grounding on REFER-format datasets (RefCOCO/+/g, the shapes world).

Segmentation, ``mode="teacher"`` (LISA's evaluation): every single-target sentence of an image goes through one
teacher-forced forward with the answer fixed to ``"[SEG]."``; the image is encoded once. ``mode="chat"``: each
sentence is asked as a question and the model generates; the prediction is the union of its masks (an answer
without ``[SEG]`` predicts nothing). Multi-target refs (``ann_id`` a list, gRefCOCO style) are always asked in chat
mode, since their answer carries one ``[SEG]`` per object; the prediction is again the union.

Boxes: the question ``"Where is {sentence}? Answer with a box."`` is generated and the first ``<box>`` of the
answer is compared with the ground-truth box of the referred object (Acc@0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import InputError, load_image, mask_to_bbox
from .metrics import IoUMeter, box_iou

SEG_QUESTION = "What is {} in this image? Please output segmentation mask."
MULTI_QUESTION = "Segment {}."
BOX_QUESTION = "Where is {}? Answer with a box."


@dataclass
class ReferReport:
    """What an evaluation measured: ``metrics`` per group ("all" and each expression kind), and one record per
    expression (image, sentence, kind, IoU)."""

    dataset: str
    split: str
    mode: str
    metrics: dict[str, dict[str, float]]
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "mode": self.mode, "metrics": self.metrics,
                "records": self.records}


def _load_split(data_root: str, dataset: str | None, split_by: str | None, split: str, image_dir: str | None,
                limit: int | None, single_only: bool):
    """(refer, image folder, {image_id: [ReferSample]} of the first ``limit`` images) for one split."""
    from ..datasets.refer import load_refer

    refer = load_refer(data_root, dataset, split_by)
    samples = [s for s in refer.sentences(split) if not single_only or len(s.ann_ids) == 1]
    if not samples:
        what = "single-target sentences" if single_only else "sentences"
        raise InputError(f"{refer.source}: no {what} in split {split!r} (splits: {', '.join(refer.splits)})")
    images = Path(image_dir) if image_dir else Path(data_root) / "images"
    if not images.is_dir():
        raise InputError(f"image folder not found: {images} (pass --image-dir)")
    by_image: dict[int, list] = {}
    for s in samples:
        by_image.setdefault(s.image_id, []).append(s)
    keep = list(by_image)[:limit] if limit else list(by_image)
    return refer, images, {i: by_image[i] for i in keep}


@torch.no_grad()
def evaluate_refer(model, data_root: str, dataset: str | None = None, split_by: str | None = None,
                   split: str = "val", image_dir: str | None = None, mode: str = "teacher",
                   chunk: int = 16, limit: int | None = None, progress: bool = True) -> ReferReport:
    """cIoU / gIoU / Prec@X of ``split``, overall and per expression kind (``limit`` = first N images)."""
    from tqdm import tqdm

    if mode not in ("teacher", "chat"):
        raise InputError(f"mode {mode!r}: expected 'teacher' or 'chat'")
    refer, images, by_image = _load_split(data_root, dataset, split_by, split, image_dir, limit, single_only=False)
    meter, records = IoUMeter(), []
    for group in tqdm(by_image.values(), desc=f"eval {dataset or Path(data_root).name} {split}",
                      disable=not progress):
        rgb = load_image(images / group[0].file_name)
        gts = {s.ref_id: refer.mask(refer.refs_by_id[s.ref_id]) for s in group}
        single = [s for s in group if len(s.ann_ids) == 1 or mode == "chat"]
        multi = [s for s in group if len(s.ann_ids) != 1 and mode == "teacher"]
        preds: list[np.ndarray] = []
        if mode == "teacher":
            for i in range(0, len(single), chunk):
                part = single[i:i + chunk]
                logits = model.segment_teacher_forced(rgb, [s.sentence for s in part], question=SEG_QUESTION)
                preds += list((logits > 0).numpy())
        else:
            preds += _chat_masks(model, rgb, [(MULTI_QUESTION if len(s.ann_ids) > 1 else SEG_QUESTION)
                                              .format(s.sentence) for s in single], chunk)
        preds += _chat_masks(model, rgb, [MULTI_QUESTION.format(s.sentence) for s in multi], chunk)
        for s, pred in zip(single + multi, preds):
            iou = meter.add(pred, gts[s.ref_id], s.kind)
            records.append({"image_id": s.image_id, "ref_id": s.ref_id, "sentence": s.sentence, "kind": s.kind,
                            "iou": iou})
    return ReferReport(dataset or Path(data_root).name, split, mode, meter.summary(), records)


def _chat_masks(model, rgb: np.ndarray, questions: list[str], chunk: int) -> list[np.ndarray]:
    out = []
    for i in range(0, len(questions), chunk):
        for res in model.segment(rgb, questions[i:i + chunk], max_new_tokens=96):
            seg = res.masks[[k for k, src in enumerate(res.sources) if src == "seg"]] if len(res.masks) else res.masks
            out.append(seg.any(0) if len(seg) else np.zeros(rgb.shape[:2], bool))
    return out


@torch.no_grad()
def evaluate_boxes(model, data_root: str, dataset: str | None = None, split_by: str | None = None,
                   split: str = "val", image_dir: str | None = None, chunk: int = 16, limit: int | None = None,
                   progress: bool = True) -> ReferReport:
    """Box grounding Acc@0.5 (and mean IoU) of single-target sentences of ``split``, overall and per kind."""
    from tqdm import tqdm

    from ..grounding.tokens import parse_boxes

    refer, images, by_image = _load_split(data_root, dataset, split_by, split, image_dir, limit, single_only=True)
    hits: dict[str, list[float]] = {}
    records = []
    for group in tqdm(by_image.values(), desc="eval boxes", disable=not progress):
        rgb = load_image(images / group[0].file_name)
        h, w = rgb.shape[:2]
        for i in range(0, len(group), chunk):
            part = group[i:i + chunk]
            results = model.segment(rgb, [BOX_QUESTION.format(s.sentence) for s in part], max_new_tokens=48)
            for s, res in zip(part, results):
                gt = _xyxy(refer.ann_mask(s.ann_ids[0]))
                boxes = parse_boxes(res.text, (h, w))
                iou = box_iou(boxes[0].box, gt) if boxes else 0.0
                for g in ("all",) + ((s.kind,) if s.kind else ()):
                    hits.setdefault(g, []).append(iou)
                records.append({"image_id": s.image_id, "sentence": s.sentence, "kind": s.kind, "answer": res.text,
                                "iou": iou})
    metrics = {g: {"Acc@0.5": float(np.mean(np.asarray(v) >= 0.5)), "mIoU": float(np.mean(v)), "n": len(v)}
               for g, v in sorted(hits.items(), key=lambda kv: (kv[0] != "all", kv[0]))}
    return ReferReport(dataset or Path(data_root).name, split, "box", metrics, records)


def _xyxy(mask: np.ndarray) -> tuple[float, float, float, float]:
    x, y, bw, bh = mask_to_bbox(mask)
    return float(x), float(y), float(x + bw), float(y + bh)
