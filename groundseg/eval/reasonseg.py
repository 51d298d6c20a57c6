"""ReasonSeg evaluation (LISA's Table 1): gIoU / cIoU (and Prec@X) over the images of a split, one expression
each, overall and for short (phrase) and long (sentence) queries (``by_kind``).

As LISA's ``ValDataset``: only the first instruction of an image's ``text`` is asked; a short query becomes
``"What is {text} in this image? Please output segmentation mask."``, a long one ``"{text} Please output
segmentation mask."``; the answer is teacher-forced to ``"[SEG]."`` (``protocol="generate"``: the model answers).
"ignore" pixels (255) count in neither intersection nor union. ``sent_id`` in ``predictions.jsonl`` is the image's
index in the split sorted by file name, ``image_id`` its file stem.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..datasets.reasonseg import ReasonSegSample, load_reasonseg
from .refer import ReferReport
from .report import build_report, write_scored_outputs
from .runner import Clock, Expression, check_run_args, protocol_name, run_and_report, score_predictions

__all__ = ["evaluate_reasonseg", "score_reasonseg_predictions"]


def _split(data_root: str, split: str, limit: int | None):
    samples = load_reasonseg(data_root, split)
    kept = samples[:limit] if limit else samples
    groups = [[Expression(sent_id=k, image_id=s.name, ref_id=None, text=s.texts[0], kind=s.kind,
                          question=s.question, image=s.image)] for k, s in enumerate(kept)]
    return samples, groups


def _ground_truth(samples: list[ReasonSegSample]):
    @lru_cache(maxsize=8)
    def gt(k: int) -> tuple[np.ndarray, np.ndarray]:
        m = samples[k].mask()
        return m == 1, m == 255

    return lambda e: gt(e.sent_id)


@torch.no_grad()
def evaluate_reasonseg(model, data_root: str, split: str = "val", protocol: str | None = None,
                       batch_size: int = 16, limit: int | None = None, progress: bool = True,
                       out: str | None = None, resume: bool = False, model_name: str | None = None) -> ReferReport:
    """gIoU / cIoU / Prec@X of a ReasonSeg split (``limit`` = first N images); ``out`` and ``resume`` as in
    :func:`groundseg.eval.refer.evaluate_refer`."""
    clock = Clock()
    protocol = protocol_name(protocol)
    check_run_args(batch_size, resume, out)
    samples, groups = _split(data_root, split, limit)
    run = {"task": "reasonseg", "dataset": "ReasonSeg", "split": split, "protocol": protocol, "model": model_name,
           "limit": limit}
    meter, records, report = run_and_report(model, groups, _ground_truth(samples), protocol, batch_size, out, run,
                                            resume, progress, f"eval ReasonSeg {split}", clock, dataset="ReasonSeg",
                                            split=split, model=model_name)
    return ReferReport("ReasonSeg", split, protocol, meter.summary(), records, report)


def score_reasonseg_predictions(predictions: str, data_root: str, split: str = "val", limit: int | None = None,
                                out: str | None = None) -> ReferReport:
    """Score a predictions file on a ReasonSeg split without a model (see
    :func:`groundseg.eval.runner.score_predictions`)."""
    clock = Clock()
    samples, groups = _split(data_root, split, limit)
    meter, records, missing = score_predictions(predictions, groups, _ground_truth(samples),
                                                frozenset(range(len(samples))), f"ReasonSeg {split}")
    report = build_report(meter, dataset="ReasonSeg", split=split, model=None, protocol="predictions",
                          num_images=len(groups), seconds=clock(), predictions=str(predictions), missing=missing)
    write_scored_outputs(out, report, meter)
    return ReferReport("ReasonSeg", split, "predictions", meter.summary(), records, report)
