"""Run outputs shared by the evaluation runners: the per-expression predictions log, ``report.json`` and
``iou_hist.png``, and the published split sizes a full run is checked against.

An output folder ``--out DIR`` holds:

* ``run.json``: what was evaluated (dataset, split, protocol, model); ``--resume`` refuses a folder whose run differs.
* ``predictions.jsonl``: one JSON object per expression (``sent_id``, ``ref_id``, ``image_id``, ``segmentation`` as
  COCO RLE, ``iou``), appended and flushed as each expression is scored, so a killed run loses at most the line being
  written. It is the one file not written atomically; :class:`PredictionLog` drops a torn last line on resume.
* ``report.json`` (written atomically at the end): the metrics (fractions in [0, 1]), counts and timing
  (``seconds`` is the wall time of the invocation that wrote it; ``resumed_expressions`` how many lines an
  interrupted run had left).
* ``iou_hist.png`` (written atomically): the histogram of per-expression IoUs, drawn with OpenCV.

In a multi-process evaluation (``accelerate launch``) every process checks the folder, the first one writes
``run.json`` and the report, and all of them append to the one ``predictions.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..io import InputError, atomic_write, read_json, save_json
from .metrics import PREC_THRESHOLDS, IoUMeter

#: Published expression (sentence) counts of the official evaluation splits: (dataset, split_by, split) -> (count,
#: verified). RefCOCO's are verified (TFDS docstring, FlagEval, the HF viewer); the others are the commonly cited
#: numbers (``../shared/reference/peers.md`` §1.5).
OFFICIAL_COUNTS: dict[tuple[str, str, str], tuple[int, bool]] = {
    ("refcoco", "unc", "val"): (10834, True),
    ("refcoco", "unc", "testA"): (5657, True),
    ("refcoco", "unc", "testB"): (5095, True),
    ("refcoco+", "unc", "val"): (10758, False),
    ("refcoco+", "unc", "testA"): (5726, False),
    ("refcoco+", "unc", "testB"): (4889, False),
    ("refcocog", "umd", "val"): (4896, False),
    ("refcocog", "umd", "test"): (9602, False),
}


def split_count_warning(dataset: str | None, split_by: str | None, split: str, count: int) -> str | None:
    """A warning when a full official split has a different number of expressions than published, else None."""
    known = OFFICIAL_COUNTS.get(((dataset or "").lower(), split_by or "", split))
    if known is None or known[0] == count:
        return None
    published, verified = known
    return (f"{dataset} ({split_by}) {split} has {count:,} expressions, the published count is {published:,}"
            f"{'' if verified else ' (commonly cited, unverified)'}: numbers are not comparable with the literature")


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the ``torch.distributed`` group (``accelerate launch`` sets one up); (0, 1) without."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


class PredictionLog:
    """``DIR/predictions.jsonl``, appended and flushed per expression.

    ``done`` maps each ``sent_id`` already in the file (from an earlier, interrupted run) to its record. A torn last
    line, which a kill during a write leaves, is cut off (by the process with ``repair``; the others read after it);
    any other unreadable line is an :class:`InputError`. Each record is one ``write`` to a file opened with
    ``O_APPEND``, so the processes of a multi-process evaluation can share the file.
    """

    def __init__(self, path: str | os.PathLike, resume: bool, repair: bool = True) -> None:
        self.path = Path(path)
        self.done: dict[Any, dict] = {}
        if not resume and self.path.exists():
            raise InputError(f"{self.path} exists: pass --resume to continue that run, or choose another --out")
        if resume and self.path.is_file():
            self.done = self._read(repair)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read(self, repair: bool) -> dict[Any, dict]:
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]  # a kill can only tear the text after the last newline
        if repair and len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        done: dict[Any, dict] = {}
        for n, line in enumerate(complete.split(b"\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["sent_id"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{self.path} line {n} is not a prediction record; cannot resume") from None
            if key in done:
                raise InputError(f"{self.path} line {n}: sent_id {key} appears twice; cannot resume")
            done[key] = rec
        return done

    def write(self, record: dict) -> None:
        """Append one record (one line) and hand it to the OS."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        os.close(self._fd)


def check_out(out: str | os.PathLike | None, resume: bool, model: str | None = None) -> None:
    """What :func:`start_run` would refuse that can be told before a model is loaded (which can take minutes): a
    folder that already holds predictions without ``--resume``, and, with ``--resume`` and a ``model`` name, a
    ``run.json`` made with another model."""
    if out and not resume and (Path(out) / "predictions.jsonl").exists():
        raise InputError(f"{Path(out) / 'predictions.jsonl'} exists: pass --resume to continue that run, or choose "
                         "another --out")
    run_path = Path(out) / "run.json" if out else None
    if resume and model is not None and run_path is not None and run_path.is_file():
        before = read_json(run_path)
        if isinstance(before, dict) and "model" in before and before["model"] != model:
            raise InputError(f"--resume: {out} holds a different run (model: {before['model']!r} there, "
                             f"{model!r} now)")


def start_run(out: str | os.PathLike, run: dict, resume: bool) -> tuple[Path, PredictionLog]:
    """Create ``out`` and its ``run.json``, or, with ``resume``, check that ``run.json`` describes the same run.

    Every process checks (they see the same files, so they fail alike); the first one writes. Returns the folder
    and its open :class:`PredictionLog`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    run_path, pred_path = out / "run.json", out / "predictions.jsonl"
    if resume and run_path.is_file():
        before = read_json(run_path)
        if not isinstance(before, dict):
            raise InputError(f"--resume: {run_path} is not a run description")
        changed = sorted(k for k in run if before.get(k) != run[k])
        if changed:
            key = changed[0]
            raise InputError(f"--resume: {out} holds a different run ({key}: {before.get(key)!r} there, "
                             f"{run[key]!r} now)")
    check_out(out, resume)
    barrier()  # everyone has checked before anything changes
    rank = dist_info()[0]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_json(run_path, run)
        log = PredictionLog(pred_path, resume, repair=True)
    barrier()
    if rank != 0:
        log = PredictionLog(pred_path, resume=True, repair=False)
    barrier()  # nobody appends before everyone has read what was done
    return out, log


def _row(summary_row: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"cIoU": summary_row["cIoU"], "gIoU": summary_row["gIoU"]}
    for t in PREC_THRESHOLDS:
        out[f"precision@{t}"] = summary_row[f"Prec@{t}"]
    out["num_expressions"] = summary_row["n"]
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}  # NaN is not JSON


def build_report(meter: IoUMeter, **info: Any) -> dict[str, Any]:
    """``report.json``'s content: ``info`` (dataset, split, model, protocol, num_images, seconds, ...), the overall
    metrics as top-level keys, and the same metrics per expression kind under ``by_kind`` (empty when the data
    carries no kinds)."""
    summary = meter.summary() if meter.ious else {"all": {"cIoU": float("nan"), "gIoU": float("nan"), "n": 0,
                                                          **{f"Prec@{t}": float("nan") for t in PREC_THRESHOLDS}}}
    report = {**_row(summary["all"]), **info}
    report["by_kind"] = {g: _row(r) for g, r in summary.items() if g != "all"}
    return report


def write_outputs(out: Path, report: dict[str, Any], ious: list[float]) -> None:
    """``report.json`` and ``iou_hist.png``, both atomically."""
    save_json(out / "report.json", report)
    save_iou_histogram(out / "iou_hist.png", ious, title=f"{report.get('dataset')} {report.get('split')}: "
                                                        f"{len(ious)} expressions")


def write_scored_outputs(out: str | os.PathLike | None, report: dict[str, Any], meter) -> None:
    """A scored predictions file's ``report.json`` and ``iou_hist.png`` in ``out`` (nothing when None)."""
    if out:
        outdir = Path(out)
        if outdir.exists() and not outdir.is_dir():
            raise InputError(f"--out {outdir}: exists and is not a folder")
        outdir.mkdir(parents=True, exist_ok=True)
        write_outputs(outdir, report, meter.ious.get("all", []))


def iou_histogram_image(ious: list[float], bins: int = 10, title: str = "", size: tuple[int, int] = (360, 560)
                        ) -> np.ndarray:
    """(H, W, 3) uint8 RGB bar chart of IoUs in ``bins`` equal bins over [0, 1] (1.0 falls in the last bin)."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 50, w - 15, 35, h - 40
    counts = np.histogram(np.clip(np.asarray(ious, float), 0, 1), bins=bins, range=(0.0, 1.0))[0]
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (150, 150, 150)
    cv2.line(img, (left, bottom), (right, bottom), black, 1)
    cv2.line(img, (left, top), (left, bottom), black, 1)
    bar_w = (right - left) / bins
    for k, c in enumerate(counts):
        x1, x2 = int(left + k * bar_w) + 2, int(left + (k + 1) * bar_w) - 2
        y = int(bottom - (bottom - top) * c / peak)
        if c:
            cv2.rectangle(img, (x1, y), (x2, bottom - 1), (31, 119, 180), -1)
            cv2.putText(img, str(int(c)), (x1, max(y - 4, top - 2)), font, 0.35, black, 1, cv2.LINE_AA)
    for k in range(0, bins + 1, max(1, bins // 5)):
        x = int(left + k * bar_w)
        cv2.line(img, (x, bottom), (x, bottom + 4), black, 1)
        cv2.putText(img, f"{k / bins:.1f}", (x - 10, bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, "IoU", ((left + right) // 2 - 10, h - 8), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.putText(img, str(peak), (5, top + 5), font, 0.4, grey, 1, cv2.LINE_AA)
    cv2.putText(img, title[:70], (left, 20), font, 0.45, black, 1, cv2.LINE_AA)
    return img


def save_iou_histogram(path: str | os.PathLike, ious: list[float], title: str = "") -> None:
    """Atomically write :func:`iou_histogram_image` as a PNG."""
    img = iou_histogram_image(ious, title=title)
    with atomic_write(path) as tmp:
        if not cv2.imwrite(str(tmp), img[:, :, ::-1]):
            raise OSError(f"could not write {path}")
