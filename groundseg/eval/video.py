"""Referring video object segmentation: J, F and J&F on Ref-YouTube-VOS, MeViS, ReVOS and Ref-DAVIS17.

Metrics (the DAVIS definitions, as the MeViS/ReVOS scorers use them):

* J -- region similarity: per frame ``|P & G| / |P | G|``, 1 when both are empty;
* F -- boundary F-measure: boundaries are the pixels that differ from their east, south or south-east neighbour;
  each boundary is dilated by a disk of radius ``ceil(0.008 * |(H, W)|)``; precision = predicted boundary pixels
  near the true boundary / predicted boundary pixels, recall the other way round; no boundary on either side
  counts as P = R = 1, only a true one as P = 1, R = 0, only a predicted one as P = 0, R = 1;
* per expression, J and F are averaged over its frames (the ground truth of a multi-object expression is the union
  of its objects); J&F = (mean J + mean F) / 2 over expressions.

Layouts (``--data-root DIR``, ``--split S``):

* ``refytvos`` / ``refdavis``: ``DIR/S/JPEGImages/<video>/<frame>.jpg``, ``DIR/S/Annotations/<video>/<frame>.png``
  (palette PNG, value = object id; or ``DIR/S/mask_dict.json``), ``DIR/meta_expressions/S/meta_expressions.json``
  (or ``DIR/S/meta_expressions.json``);
* ``mevis``: ``DIR/S/JPEGImages/``, ``DIR/S/mask_dict.json`` (anno id -> per-frame COCO RLE or null),
  ``DIR/S/meta_expressions.json``; splits ``train``, ``valid_u`` (masks) -- ``valid`` has none;
* ``revos``: ``DIR/JPEGImages/``, ``DIR/mask_dict.json``, ``DIR/meta_expressions_S.json`` (or ``..._S_.json``).

Predictions (``--predictions PRED``, or what ``--out`` writes): ``PRED/<video>/<exp_id>/<frame>.png`` (or under
``PRED/Annotations/``), any non-zero pixel is foreground -- the layout the challenge servers take.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from ..io import InputError, read_json, rle_to_mask
from ..video import FileFrames, read_binary_png, read_label_png

FORMATS = ("refytvos", "mevis", "revos", "refdavis")
BOUND_TH = 0.008


# ------------------------------------------------------------------------------------------- metrics

def region_j(pred: np.ndarray, gt: np.ndarray) -> float:
    """J of one frame: IoU of two (H, W) masks, 1 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose value differs from the east, south or south-east neighbour. On the last row only
    the east neighbour counts, on the last column only the south one, and the corner pixel is never a boundary."""
    m = np.asarray(mask, bool)
    east = np.zeros_like(m)
    south = np.zeros_like(m)
    diag = np.zeros_like(m)
    east[:, :-1] = m[:, 1:]
    south[:-1, :] = m[1:, :]
    diag[:-1, :-1] = m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2 <= radius * radius).astype(np.uint8)


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of one frame (see the module docstring); ``bound_th`` < 1 is a fraction of the image diagonal."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    radius = bound_th if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*pred.shape)))
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0  # (P, R) = (1, 0) or (0, 1)
    disk = _disk(int(radius))
    near_gt = cv2.dilate(gb.astype(np.uint8), disk).astype(bool)
    near_pred = cv2.dilate(pb.astype(np.uint8), disk).astype(bool)
    precision = (pb & near_gt).sum() / n_p
    recall = (gb & near_pred).sum() / n_g
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


@dataclass
class ExpressionScore:
    """Mean J and F of one expression over its frames."""

    key: str
    j: float
    f: float
    num_frames: int
    # the ground truth is empty on a frame between frames where it is not: the object leaves and comes back (or
    # is occluded for a while), which a tracker must survive
    reappears: bool = False

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


class _FrameScores:
    """J and F of one expression, a frame at a time."""

    def __init__(self, key: str):
        self.key, self.js, self.fs, self.present = key, [], [], []

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise InputError(f"{self.key}: prediction {pred.shape[1]}x{pred.shape[0]} vs ground truth "
                             f"{gt.shape[1]}x{gt.shape[0]}")
        self.js.append(region_j(pred, gt))
        self.fs.append(boundary_f(pred, gt))
        self.present.append(bool(gt.any()))

    def result(self) -> ExpressionScore:
        if not self.js:
            raise InputError(f"{self.key}: no frames to score")
        seen = np.flatnonzero(self.present)
        gap = len(seen) > 0 and not all(self.present[seen[0]:seen[-1] + 1])
        return ExpressionScore(self.key, float(np.mean(self.js)), float(np.mean(self.fs)), len(self.js), gap)


def score_frames(pairs: Iterable[tuple[np.ndarray, np.ndarray]], key: str = "") -> ExpressionScore:
    """(prediction, ground truth) mask pairs of one expression's frames -> its mean J and F."""
    acc = _FrameScores(key)
    for pred, gt in pairs:
        acc.add(pred, gt)
    return acc.result()


def summarize(scores: list[ExpressionScore]) -> dict[str, float]:
    """``J&F``, ``J``, ``F`` (fractions) averaged over expressions, and ``num_expressions``."""
    if not scores:
        return {"J&F": float("nan"), "J": float("nan"), "F": float("nan"), "num_expressions": 0}
    j = float(np.mean([s.j for s in scores]))
    f = float(np.mean([s.f for s in scores]))
    return {"J&F": (j + f) / 2, "J": j, "F": f, "num_expressions": len(scores)}


# ------------------------------------------------------------------------------------------- datasets

@dataclass
class VideoExpression:
    """One referring expression over one video: ``frames`` are frame names (no extension), ``targets`` the object
    ids (palette annotations) or anno ids (mask_dict) whose union is the ground truth."""

    video: str
    exp_id: str
    text: str
    frames: list[str]
    targets: list[str]
    kind: str | None = None  # the shapes world's "attribute"/"motion" (its meta_expressions "kind"), else None

    @property
    def key(self) -> str:
        return f"{self.video}/{self.exp_id}"


class VideoDataset:
    """A loaded split: expressions in file order, frame paths, and ground-truth masks per expression and frame."""

    def __init__(self, name: str, frame_dir: Path, expressions: list[VideoExpression], annotations: Path | None,
                 mask_dict: dict | None):
        self.name = name
        self.frame_dir = frame_dir
        self.expressions = expressions
        self.annotations = annotations
        self.mask_dict = mask_dict

    @property
    def num_videos(self) -> int:
        return len({e.video for e in self.expressions})

    def frame_paths(self, e: VideoExpression) -> list[Path]:
        out = []
        for f in e.frames:
            for ext in (".jpg", ".jpeg", ".png"):
                p = self.frame_dir / e.video / f"{f}{ext}"
                if p.is_file():
                    out.append(p)
                    break
            else:
                raise InputError(f"{self.frame_dir / e.video}: frame {f} not found (.jpg/.png)")
        return out

    def ground_truth(self, e: VideoExpression, shape: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """(H, W) bool ground truth of each frame of ``e``, streamed."""
        for t, f in enumerate(e.frames):
            if self.mask_dict is not None:
                gt = None
                for a in e.targets:
                    rles = self.mask_dict.get(str(a))
                    if rles is None:
                        raise InputError(f"{self.name}: anno_id {a} of {e.key} is not in mask_dict.json")
                    rle = rles[t] if t < len(rles) else None
                    if rle is not None:
                        m = rle_to_mask(rle)
                        gt = m if gt is None else gt | m
                if gt is None:
                    if shape is None:
                        h, w = cv2.imread(str(self.frame_paths(e)[t])).shape[:2]
                        shape = (h, w)
                    gt = np.zeros(shape, bool)
                yield gt
            else:
                labels = read_label_png(self.annotations / e.video / f"{f}.png")
                yield np.isin(labels, [int(x) for x in e.targets])


def _first(*paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise InputError(f"not found: {paths[0]}" + (f" (nor {', '.join(str(p) for p in paths[1:])})"
                                                  if len(paths) > 1 else ""))


def load_video_dataset(data_root: str | Path, fmt: str, split: str) -> VideoDataset:
    """Load one split of a referring-video dataset in ``fmt``'s layout (module docstring)."""
    root = Path(data_root)
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise InputError(f"--data-root {root}: folder not found")
    if fmt == "revos":
        base = root
        meta = _first(root / f"meta_expressions_{split}.json", root / f"meta_expressions_{split}_.json")
    elif fmt == "mevis":
        base = root / split
        meta = _first(base / "meta_expressions.json")
    else:
        base = root / split
        meta = _first(root / "meta_expressions" / split / "meta_expressions.json", base / "meta_expressions.json")
    frame_dir = _first(base / "JPEGImages")
    mask_path = base / "mask_dict.json"
    annotations = base / "Annotations"
    mask_dict = None
    if mask_path.is_file():
        mask_dict = read_json(mask_path)
        if not isinstance(mask_dict, dict):
            raise InputError(f"{mask_path}: expected {{anno_id: [per-frame RLE or null]}}")
    elif fmt in ("mevis", "revos") or not annotations.is_dir():
        raise InputError(f"{root}: split {split!r} has no ground truth ({mask_path.name} or Annotations/); "
                         "score it on the benchmark's server")
    data = read_json(meta)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        raise InputError(f"{meta}: expected {{'videos': {{video: {{'frames': [...], 'expressions': {{...}}}}}}}}")
    exprs = []
    for video, entry in data["videos"].items():
        frames = [str(f) for f in entry.get("frames", [])]
        if not frames:
            raise InputError(f"{meta}: video {video} lists no frames")
        for exp_id, e in entry.get("expressions", {}).items():
            if not isinstance(e, dict) or "exp" not in e:
                raise InputError(f"{meta}: expression {exp_id} of video {video} has no 'exp'")
            key = "anno_id" if mask_dict is not None else "obj_id"
            ids = e.get(key)
            if ids is None:
                raise InputError(f"{meta}: expression {exp_id} of video {video} has no {key!r}")
            kind = e.get("kind")
            exprs.append(VideoExpression(video, str(exp_id), e["exp"], frames,
                                         [str(x) for x in (ids if isinstance(ids, list) else [ids])],
                                         str(kind) if kind is not None else None))
    if not exprs:
        raise InputError(f"{meta}: no expressions")
    return VideoDataset(f"{fmt} {split}", frame_dir, exprs, annotations if mask_dict is None else None, mask_dict)


# ------------------------------------------------------------------------------------------- running

@dataclass
class VideoReport:
    metrics: dict[str, float]
    report: dict
    scores: list[ExpressionScore]


def _prediction_masks(pred_root: Path, e: VideoExpression) -> Iterator[np.ndarray]:
    folder = pred_root / e.video / e.exp_id
    if not folder.is_dir() and (pred_root / "Annotations").is_dir():
        folder = pred_root / "Annotations" / e.video / e.exp_id
    for f in e.frames:
        p = folder / f"{f}.png"
        if not p.is_file():
            raise InputError(f"--predictions: {p} not found (expected PRED/<video>/<exp_id>/<frame>.png)")
        yield read_binary_png(p)


def _model_scores(model, ds: VideoDataset, group: list[VideoExpression], write_to: Path | None
                  ) -> list[ExpressionScore]:
    """Track every expression of ``group`` (one video, the same frames) in one ``model.track`` call, so each frame
    is read and encoded once for all of them; score each as the frames come (and write its masks)."""
    from ..video import save_label_png

    source = FileFrames(ds.frame_paths(group[0]), group[0].video)
    if write_to is not None:
        for e in group:
            (write_to / e.video / e.exp_id).mkdir(parents=True, exist_ok=True)
    truth = [ds.ground_truth(e) for e in group]
    accs = [_FrameScores(e.key) for e in group]
    for frame in model.track(source, [e.text for e in group]):
        for k, e in enumerate(group):
            mask = frame.masks[k]
            if write_to is not None:
                save_label_png(write_to / e.video / e.exp_id / f"{e.frames[frame.index]}.png", mask.astype(np.uint8))
            gt = next(truth[k], None)
            if gt is None:
                raise InputError(f"{e.key}: the model returned more frames than the expression has")
            accs[k].add(mask, gt)
    return [acc.result() for acc in accs]


def _groups(exprs: list[VideoExpression]) -> list[list[VideoExpression]]:
    """Consecutive expressions of the same video over the same frames, in order."""
    groups: list[list[VideoExpression]] = []
    for e in exprs:
        if groups and groups[-1][0].video == e.video and groups[-1][0].frames == e.frames:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def evaluate_video(data_root: str, fmt: str, split: str, model=None, predictions: str | None = None,
                   out: str | None = None, resume: bool = False, model_name: str | None = None,
                   limit: int | None = None, progress: bool = False) -> VideoReport:
    """Score a model (``model.track``) or a folder of predicted PNGs on one split; with ``out``, write
    ``predictions.jsonl`` (per-expression J and F, as they come), the predicted masks under
    ``out/Annotations/<video>/<exp_id>/``, ``report.json`` and a histogram of per-expression J&F."""
    from tqdm import tqdm

    from .report import save_iou_histogram, start_run

    ds = load_video_dataset(data_root, fmt, split)
    exprs = ds.expressions[:limit] if limit else ds.expressions
    pred_root = Path(predictions) if predictions else None
    if pred_root is not None and not pred_root.is_dir():
        raise InputError(f"--predictions {pred_root}: folder not found")
    t0 = time.perf_counter()
    log = None
    out_dir = None
    if out:
        run = {"task": "video", "format": fmt, "split": split, "data_root": str(Path(data_root).resolve()),
               "model": model_name if pred_root is None else None,
               "predictions": str(pred_root.resolve()) if pred_root else None, "limit": limit}
        out_dir, log = start_run(out, run, resume)
    done = log.done if log else {}
    by_key: dict[str, ExpressionScore] = {}
    bar = tqdm(total=len(exprs), disable=not progress, unit="expr")
    try:
        for group in _groups(exprs):
            for e in group:
                if e.key in done:
                    r = done[e.key]
                    by_key[e.key] = ExpressionScore(e.key, r["J"], r["F"], r["num_frames"],
                                                    bool(r.get("reappears", False)))
                    bar.update(1)
            todo = [e for e in group if e.key not in done]
            if not todo:
                continue
            if pred_root is not None:
                new = [score_frames(zip(_prediction_masks(pred_root, e), ds.ground_truth(e)), e.key) for e in todo]
            else:
                new = _model_scores(model, ds, todo, out_dir / "Annotations" if out_dir else None)
            for e, sc in zip(todo, new):
                by_key[e.key] = sc
                if log:
                    log.write({"sent_id": e.key, "video": e.video, "exp_id": e.exp_id, "exp": e.text, "J": sc.j,
                               "F": sc.f, "J&F": sc.jf, "num_frames": sc.num_frames,
                               "reappears": sc.reappears})
                bar.update(1)
    finally:
        bar.close()
        if log:
            log.close()
    scores = [by_key[e.key] for e in exprs]
    metrics = summarize(scores)
    metrics["num_videos"] = len({e.video for e in exprs})  # ReVOS video ids hold "/" themselves
    kinds = sorted({e.kind for e in exprs if e.kind is not None})
    metrics["by_kind"] = {k: summarize([s for s, e in zip(scores, exprs) if e.kind == k]) for k in kinds}
    # expressions whose object leaves the frame (or is hidden) and comes back
    metrics["reappearing"] = summarize([s for s in scores if s.reappears])
    report = {**metrics, "format": fmt, "split": split, "dataset": fmt, "model": model_name,
              "predictions": predictions, "seconds": round(time.perf_counter() - t0, 2),
              "resumed_expressions": len(done)}
    if out_dir:
        from ..io import save_json

        save_json(out_dir / "report.json", report)
        save_iou_histogram(out_dir / "iou_hist.png", [s.jf for s in scores],
                           title=f"{fmt} {split}: J&F of {len(scores)} expressions")
    return VideoReport(metrics, report, scores)


def format_video_table(metrics: dict) -> str:
    """A table, percentages with two decimals as the field reports them: all expressions, then one row per kind
    where the dataset names kinds."""
    head = f"{'':10} {'J&F':>7} {'J':>7} {'F':>7} {'expr':>6} {'videos':>6}"

    def row(name: str, m: dict, videos: str) -> str:
        return (f"{name:10} {100 * m['J&F']:7.2f} {100 * m['J']:7.2f} {100 * m['F']:7.2f} "
                f"{m['num_expressions']:6d} {videos:>6}")

    lines = [head, row("all", metrics, str(metrics["num_videos"]))]
    lines += [row(k, m, "") for k, m in metrics.get("by_kind", {}).items()]
    if metrics.get("reappearing", {}).get("num_expressions"):
        lines.append(row("reappears", metrics["reappearing"], ""))
    return "\n".join(lines)


def run_cli(args) -> int:
    """``groundseg eval video``: load the model unless ``--predictions`` is given, evaluate, print the table."""
    import sys

    if not args.format:
        raise InputError(f"eval video: --format is required ({', '.join(FORMATS)})")
    if args.format not in FORMATS:
        raise InputError(f"--format {args.format!r}: expected one of {', '.join(FORMATS)}")
    if args.resume and not args.out:
        raise InputError("--resume needs --out, the folder of the run to continue")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: expected at least 1")
    load_video_dataset(args.data_root, args.format, args.split)  # layout errors before a model loads
    model = None
    name = None
    if args.predictions:
        if args.model:
            raise InputError("--predictions scores a folder without a model: drop --model")
    else:
        import torch

        from ..cli import DTYPES, _device
        from ..hub import load_model
        from ..tracking import default_track_model

        from .report import check_out

        name = args.model or default_track_model()
        check_out(args.out, args.resume, name)  # before the model, which can take minutes to load
        model = load_model(name, device=_device(args.device), dtype=getattr(torch, DTYPES[args.dtype]))
        if not hasattr(model, "track"):
            raise InputError(f"--model {name}: the {model.family} family cannot track videos; use a Sa2VA model")
    res = evaluate_video(args.data_root, args.format, args.split, model=model, predictions=args.predictions,
                         out=args.out, resume=args.resume, model_name=name, limit=args.limit,
                         progress=sys.stderr.isatty())
    print(format_video_table(res.metrics))
    if args.out:
        print(f"wrote {Path(args.out) / 'report.json'}")
    return 0
