"""The segmentation evaluation loop shared by REFER and ReasonSeg: expressions grouped by image, predicted with
LISA's teacher-forced protocol or by generation, scored, logged and resumable; and scoring a predictions file
without a model.

Protocols:

* ``"teacher-forced"`` (LISA's evaluation, the default): the expressions of an image go through one forward per
  ``batch_size`` of them, the answer fixed to ``"[SEG]."``; the image is encoded once per forward.
* ``"generate"``: each question is asked and the model generates; the prediction is the union of the masks of its
  ``[SEG]`` tokens (an answer without one predicts nothing).

Multi-target expressions (``multi``) are always generated, since their answer carries one ``[SEG]`` per object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io import InputError, load_image, mask_to_rle, rle_to_mask
from .metrics import IoUMeter
from .report import PredictionLog, build_report, dist_info, start_run, write_outputs

PROTOCOLS = ("teacher-forced", "generate")
MODE_ALIASES = {"teacher": "teacher-forced", "chat": "generate"}
MULTI_QUESTION = "Segment {}."

#: expression -> (ground-truth mask, ignore mask or None), both (H, W) bool at the image size.
GroundTruth = Callable[["Expression"], "tuple[np.ndarray, np.ndarray | None]"]


@dataclass(frozen=True)
class Expression:
    """One expression to segment: ``sent_id`` is its key in ``predictions.jsonl`` (unique within a split),
    ``question`` the template its text is put into, ``image`` the image file."""

    sent_id: Any
    image_id: Any
    ref_id: Any
    text: str
    kind: str | None
    question: str
    image: Path
    multi: bool = False


def protocol_name(protocol: str | None = None, mode: str | None = None) -> str:
    """The protocol from ``protocol`` or the older ``mode`` alias (teacher / chat); teacher-forced by default."""
    if mode is not None and mode not in MODE_ALIASES:
        raise InputError(f"mode {mode!r}: expected 'teacher' or 'chat'")
    if protocol is not None and protocol not in PROTOCOLS:
        raise InputError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    aliased = MODE_ALIASES.get(mode) if mode is not None else None
    if protocol is not None and aliased is not None and protocol != aliased:
        raise InputError(f"--mode {mode} means --protocol {aliased}, which contradicts --protocol {protocol}")
    return protocol or aliased or "teacher-forced"


def check_run_args(batch_size: int, resume: bool, out) -> None:
    """The options every model run shares: a positive batch size, and --resume only with --out."""
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: expected at least 1")
    if resume and not out:
        raise InputError("--resume needs --out, the folder of the run to continue")


def check_unique(groups: list[list[Expression]], where: str) -> None:
    """Refuse a split whose sentences share a ``sent_id`` (predictions are keyed by it)."""
    seen: set = set()
    for group in groups:
        for e in group:
            if e.sent_id in seen:
                raise InputError(f"{where}: sent_id {e.sent_id!r} appears twice; predictions cannot be keyed by it")
            seen.add(e.sent_id)


def predict(model, rgb: np.ndarray, exprs: list[Expression], protocol: str, batch_size: int
            ) -> Iterator[tuple[Expression, np.ndarray]]:
    """(expression, (H, W) bool prediction) for each of ``exprs`` of one image, in order."""
    runs: list[tuple[tuple[bool, str], list[Expression]]] = []
    for e in exprs:  # consecutive expressions asked the same way share forwards
        how = (protocol == "generate" or e.multi, MULTI_QUESTION if e.multi else e.question)
        if runs and runs[-1][0] == how and len(runs[-1][1]) < batch_size:
            runs[-1][1].append(e)
        else:
            runs.append((how, [e]))
    for (generate, question), part in runs:
        if generate:
            masks = _generated_masks(model, rgb, [question.format(e.text) for e in part])
        else:
            logits = model.segment_teacher_forced(rgb, [e.text for e in part], question=question)
            masks = list((logits > 0).cpu().numpy())
        yield from zip(part, masks)


def _generated_masks(model, rgb: np.ndarray, questions: list[str]) -> list[np.ndarray]:
    out = []
    for res in model.segment(rgb, questions, max_new_tokens=96):
        keep = [k for k, src in enumerate(res.sources) if src == "seg"]
        seg = res.masks[keep] if len(res.masks) else res.masks
        out.append(seg.any(0) if len(seg) else np.zeros(rgb.shape[:2], bool))
    return out


def run_masks(model, groups: list[list[Expression]], ground_truth: GroundTruth, protocol: str = "teacher-forced",
              batch_size: int = 16, log: PredictionLog | None = None, progress: bool = True,
              desc: str = "eval") -> tuple[IoUMeter, list[dict]]:
    """Predict and score every expression of ``groups`` (one list per image), through :func:`run_groups`.

    Expressions already in ``log.done`` (an interrupted run) are scored from their logged RLE instead of being
    predicted again; each new one is appended to ``log``. Returns the meter and one record per expression
    (``sent_id``, ``image_id``, ``ref_id``, ``sentence``, ``kind``, ``iou``), in split order.
    """
    meter = IoUMeter()

    def logged(e: Expression, rec: dict) -> float:
        gt, ignore = ground_truth(e)
        pred = record_mask(rec.get("segmentation"), gt.shape, f"{log.path} sent_id {e.sent_id}")
        return meter.add(pred, gt, e.kind, ignore)

    def fresh(rgb: np.ndarray, todo: list[Expression]) -> Iterator[tuple[Expression, float, dict]]:
        for e, pred in predict(model, rgb, todo, protocol, batch_size):
            gt, ignore = ground_truth(e)
            yield e, meter.add(pred, gt, e.kind, ignore), {"segmentation": mask_to_rle(pred)}

    return run_groups(groups, meter, logged, fresh, log, progress, desc)


def run_groups(groups: list[list[Expression]], meter: Any, logged: Callable[[Expression, dict], float],
               fresh: Callable[[np.ndarray, list[Expression]], Iterator[tuple[Expression, float, dict]]],
               log: PredictionLog | None = None, progress: bool = True, desc: str = "eval"
               ) -> tuple[Any, list[dict]]:
    """The loop of every benchmark with a prediction log: for each image of ``groups``, expressions already in
    ``log.done`` are scored by ``logged(expression, logged record)`` (which adds them to ``meter`` and returns the
    IoU); the others go to ``fresh(image, expressions)``, which predicts, adds to ``meter`` and yields (expression,
    IoU, the prediction's log fields). Each new prediction is appended to ``log``. Returns ``meter`` and one record
    per expression (``sent_id``, ``image_id``, ``ref_id``, ``sentence``, ``kind``, ``iou``), in split order.

    Under ``accelerate launch`` (an initialised ``torch.distributed`` group of N processes) process r takes the
    images ``r, r + N, ...``, all of them append to the one log, and the meters (any class with a no-argument
    constructor and ``merge``) and records are gathered, so every process returns what a single process would (the
    metrics' sums are order-free).
    """
    from tqdm import tqdm

    rank, world = dist_info()
    mine = groups[rank::world]
    records: dict[Any, dict] = {}
    done = log.done if log is not None else {}
    bar = tqdm(total=sum(len(g) for g in mine), unit="expr", disable=not progress or rank != 0, smoothing=0.1,
               desc=desc if world == 1 else f"{desc} [process 0 of {world}]")
    try:
        for group in mine:
            todo = []
            for e in group:
                if e.sent_id not in done:
                    todo.append(e)
                    continue
                records[e.sent_id] = expression_record(e, logged(e, done[e.sent_id]))
                bar.update(1)
            if not todo:
                continue
            for e, iou, fields in fresh(load_image(todo[0].image), todo):
                records[e.sent_id] = expression_record(e, iou)
                if log is not None:
                    log.write({"sent_id": e.sent_id, "ref_id": e.ref_id, "image_id": e.image_id, **fields,
                               "iou": iou})
                bar.update(1)
    finally:
        bar.close()
    if world > 1:
        meter, records = _gather(meter, records, world)
    return meter, [records[e.sent_id] for g in groups for e in g]


def _gather(meter: Any, records: dict, world: int) -> tuple[Any, dict]:
    """Every process's meter and records, merged in process order."""
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, (meter, records))
    merged, all_records = type(meter)(), {}
    for m, r in parts:
        merged.merge(m)
        all_records.update(r)
    return merged, all_records


def expression_record(e: Expression, iou: float) -> dict[str, Any]:
    """One line of a referring evaluation's ``predictions.jsonl``, without the prediction itself."""
    return {"sent_id": e.sent_id, "image_id": e.image_id, "ref_id": e.ref_id, "sentence": e.text, "kind": e.kind,
            "iou": iou}


def record_mask(rle: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    """Decode a logged or submitted RLE, checking it is a mask of the image's size."""
    if rle is None:
        raise InputError(f"{where}: no 'segmentation'")
    try:
        mask = rle_to_mask(rle)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    if mask.shape != tuple(shape):
        raise InputError(f"{where}: segmentation size {list(mask.shape)} differs from the image size "
                         f"{list(shape)}")
    return mask


def read_predictions(path: str | Path, keys: tuple[str, ...] = ("sent_id", "segmentation")
                     ) -> list[tuple[str, dict]]:
    """(location, entry) for each prediction of a JSONL file or a JSON list, each an object with ``keys``;
    InputError names a bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--predictions {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc})") from None
        items = [(f"{path} entry {k}", e) for k, e in enumerate(entries)]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path} line {n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path} line {n} is not valid JSON ({exc.msg})") from None
    for where, e in items:
        if not isinstance(e, dict) or any(k not in e for k in keys):
            raise InputError(f"{where}: expected an object with {' and '.join(map(repr, keys))}")
    return items


def match_predictions(path: str | Path, groups: list[list[Expression]],
                      decode: Callable[[Expression, dict, str], Any], split_names: frozenset = frozenset(),
                      where: str = "the split",
                      keys: tuple[str, ...] = ("sent_id", "segmentation")) -> dict[Any, Any]:
    """{sent_id: decode(expression, entry, location)} for the entries of a predictions file (see
    :func:`read_predictions`) that name an expression of ``groups``; ``split_names`` are further sent_ids that are
    ignored (mapped to None). InputError, naming the line, for an unknown or repeated ``sent_id``."""
    exprs = {e.sent_id: e for g in groups for e in g}
    given: dict[Any, Any] = {}
    for loc, entry in read_predictions(path, keys):
        key = entry["sent_id"]
        if isinstance(key, (list, dict)):
            raise InputError(f"{loc}: sent_id {key!r}: expected a sentence id of {where}")
        if key in given:
            raise InputError(f"{loc}: sent_id {key!r} appears twice")
        if key not in exprs:
            if key in split_names:
                given[key] = None
                continue
            raise InputError(f"{loc}: sent_id {key!r} is not a sentence of {where}")
        given[key] = decode(exprs[key], entry, loc)
    return given


def score_predictions(path: str | Path, groups: list[list[Expression]], ground_truth: GroundTruth,
                      split_names: frozenset = frozenset(), where: str = "the split"
                      ) -> tuple[IoUMeter, list[dict], int]:
    """Score a predictions file (JSONL or a JSON list of ``{"sent_id", "segmentation": RLE}``) without a model.

    Sentences of ``groups`` absent from the file count as empty predictions; returns (meter, records, how many were
    missing). Raises InputError, naming the line, for an unknown or repeated ``sent_id``, a malformed RLE or a mask
    whose size differs from its image. ``split_names`` are further sent_ids that are ignored (sentences of the split
    beyond ``--limit``)."""
    given = match_predictions(path, groups, lambda e, entry, loc: record_mask(entry["segmentation"],
                                                                              ground_truth(e)[0].shape, loc),
                              split_names, where)
    meter, records, missing = IoUMeter(), [], 0
    for group in groups:
        for e in group:
            gt, ignore = ground_truth(e)
            pred = given.get(e.sent_id)
            if pred is None:
                missing += 1
                pred = np.zeros_like(gt)
            records.append(expression_record(e, meter.add(pred, gt, e.kind, ignore)))
    return meter, records, missing


class Clock:
    """Seconds since construction (for ``report.json``'s ``seconds``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def run_and_report(net, groups: list[list[Expression]], ground_truth: GroundTruth, protocol: str, batch_size: int,
                   out: str | None, run: dict[str, Any], resume: bool, progress: bool, desc: str, clock: "Clock",
                   *, loop: Callable | None = None, build: Callable = build_report,
                   **info: Any) -> tuple[IoUMeter, list[dict[str, Any]], dict[str, Any]]:
    """The run shared by every mask benchmark, with the model ``net``: open (or resume) ``out``'s prediction log,
    predict and score every expression, build the report (``info`` are its extra keys) and, on the main process,
    write it with the IoU histogram. Returns (meter, records, report).

    ``loop`` (:func:`run_masks` by default; same arguments) predicts and scores, ``build`` (:func:`build_report`)
    makes the report from its meter: box grounding passes its own pair."""
    log = None
    if out:
        out, log = start_run(out, run, resume)
    try:
        meter, records = (loop or run_masks)(net, groups, ground_truth, protocol, batch_size, log, progress,
                                             desc=desc)
    finally:
        if log is not None:
            log.close()
    report = build(meter, protocol=protocol, num_images=len(groups), seconds=clock(), **info)
    if out:
        report["resumed_expressions"] = len(log.done)
        if dist_info()[0] == 0:
            write_outputs(out, report, meter.ious.get("all", []))
    return meter, records, report
