"""Grounded conversation generation (GCG) and region-caption evaluation, as GLaMM's ``eval/gcg`` and
``eval/region_captioning`` compute them (reference/glamm.md §5.1, §5.3).

GCG, per split, against GranD-f's ``{split}_gcg_coco_mask_gt.json`` (COCO instances, category 1) and
``{split}_gcg_coco_caption_gt.json`` (COCO captions whose annotations carry ``labels``, the GT phrases):

* **AP50**: pycocotools ``COCOeval(..., "segm")`` on category 1, every predicted mask scored 1.0;
* **mIoU**: per image the pred x GT IoU matrix, greedily paired one-to-one by the largest IoU while it is > 0,
  the mean of the paired IoUs (0 when nothing pairs), averaged over images; unpaired masks cost nothing;
* **mask recall**: per image, GT mask i and predicted mask j pair (greedily by IoU) when IoU >= 0.5 *and* the
  cosine similarity of GT phrase i and predicted phrase j >= 0.5 (mean-pooled last hidden states of a text encoder,
  bert-base-uncased officially, given here by path); the greedy search stops at the first pair that fails either
  test. Recall = pairs / GT phrases. As officially, phrase k belongs to mask k by index, and an image whose
  phrase and mask lists disagree so that the search indexes past one of them scores 0 pairs;
* **METEOR / CIDEr** (``eval/captions.py``) of the cleaned caption against the GT caption.

Region captions: a COCO-style file with one annotation per "image" (``bbox`` xywh, ``caption``); the model
describes each box with GLaMM's region question; METEOR and CIDEr of the cleaned answers.

Runs write ``--out`` like ``groundseg eval refer``: ``run.json``, ``predictions.jsonl`` (one line per image, or
per region, appended as it goes; ``--resume`` continues) and ``report.json``.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..io import InputError, load_image, mask_to_rle, read_json, rle_to_mask, save_json
from .captions import CaptionMetricsUnavailable, caption_backend, caption_metrics
from .report import dist_info, start_run
from .runner import Clock

GT_MASK_FILE = "{split}_gcg_coco_mask_gt.json"
GT_CAPTION_FILE = "{split}_gcg_coco_caption_gt.json"
REGCAP_FILE = "{split}_regcap_coco_caption_gt.json"
_PHRASE = re.compile(r"<p>(.*?)</p>")


# ------------------------------------------------------------------------------------------ data

@dataclass
class GcgImage:
    """One evaluation image: GT masks (COCO segmentations, decoded on demand) in annotation order, the GT phrases
    (``labels``) and the GT captions."""

    image_id: Any
    file_name: str
    height: int
    width: int
    segmentations: list = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)

    def masks(self) -> list[np.ndarray]:
        return [decode_segmentation(s, self.height, self.width, f"image {self.image_id!r}")
                for s in self.segmentations]


def decode_segmentation(segm: Any, h: int, w: int, where: str) -> np.ndarray:
    """A COCO segmentation (RLE with string or list counts, or polygons) -> (h, w) bool."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segm, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            return rle_to_mask(segm)
        return mask_utils.decode(rle).astype(bool)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{where}: unreadable segmentation ({type(e).__name__}: {e})") from None


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected a COCO-style object with 'images' and 'annotations' lists")
    return data


def _field(obj: dict, key: str, path: Path, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(f"{path}: {where} has no '{key}'")
    return obj[key]


def load_gcg_split(data_root: str | Path, split: str, limit: int | None = None) -> tuple[list[GcgImage], dict]:
    """The GranD-f evaluation files of ``split`` in ``data_root``: (images in caption-file order, the raw mask GT
    dict, kept for COCOeval). ``limit``: the first N images."""
    root = Path(data_root)
    mask_path, cap_path = root / GT_MASK_FILE.format(split=split), root / GT_CAPTION_FILE.format(split=split)
    masks, caps = _read(mask_path, "GCG mask ground truth"), _read(cap_path, "GCG caption ground truth")
    images: dict[Any, GcgImage] = {}
    for k, im in enumerate(caps["images"]):
        iid = _field(im, "id", cap_path, f"images[{k}]")
        images[iid] = GcgImage(iid, str(_field(im, "file_name", cap_path, f"images[{k}]")),
                               int(im.get("height", 0)), int(im.get("width", 0)))
    sizes = {}
    for k, im in enumerate(masks["images"]):
        iid = _field(im, "id", mask_path, f"images[{k}]")
        sizes[iid] = (int(_field(im, "height", mask_path, f"images[{k}]")),
                      int(_field(im, "width", mask_path, f"images[{k}]")))
    for iid, g in images.items():
        if iid not in sizes:
            raise InputError(f"{mask_path}: image id {iid!r} of {cap_path.name} is missing")
        g.height, g.width = sizes[iid]
    for k, a in enumerate(caps["annotations"]):
        iid = _field(a, "image_id", cap_path, f"annotations[{k}]")
        if iid not in images:
            raise InputError(f"{cap_path}: annotations[{k}] refers to unknown image id {iid!r}")
        images[iid].captions.append(str(_field(a, "caption", cap_path, f"annotations[{k}]")))
        labels = a.get("labels", [])
        if not isinstance(labels, list):
            raise InputError(f"{cap_path}: annotations[{k}]['labels'] must be a list of phrases")
        if not images[iid].phrases:
            images[iid].phrases = [str(x) for x in labels]
    for k, a in enumerate(masks["annotations"]):
        iid = _field(a, "image_id", mask_path, f"annotations[{k}]")
        if iid in images:
            images[iid].segmentations.append(_field(a, "segmentation", mask_path, f"annotations[{k}]"))
    out = list(images.values())
    if not out:
        raise InputError(f"{cap_path}: no images")
    return (out[:limit] if limit else out), masks


def find_image(root: Path, image_dir: str | None, file_name: str) -> Path:
    """``--image-dir/file_name``, else the first of DATA_ROOT/images, DATA_ROOT/../images, DATA_ROOT that has it."""
    if image_dir:
        return Path(image_dir) / file_name
    for d in (root / "images", root.parent / "images", root):
        if (d / file_name).is_file():
            return d / file_name
    raise InputError(f"image {file_name} not found in {root / 'images'}, {root.parent / 'images'} or {root} "
                     "(pass --image-dir)")


# ------------------------------------------------------------------------------------------ metrics

def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks (0 when both are empty; the official code divides by zero there)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def iou_matrix(rows: Sequence[np.ndarray], cols: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([[mask_iou(r, c) for c in cols] for r in rows], dtype=np.float64).reshape(len(rows), len(cols))


def greedy_miou(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> float:
    """GLaMM's per-image mIoU: pair by the largest remaining IoU (removing its row and column) while it is > 0;
    mean of the paired IoUs, 0 when none pairs."""
    m = iou_matrix(pred_masks, gt_masks)
    paired = []
    while m.size and m.max() > 0:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        paired.append(m[i, j])
        m = np.delete(np.delete(m, i, 0), j, 1)
    return float(np.mean(paired)) if paired else 0.0


def recall_pairs(gt_masks: Sequence[np.ndarray], gt_phrases: Sequence[str], pred_masks: Sequence[np.ndarray],
                 pred_phrases: Sequence[str], similarity: Callable[[str, str], float], iou_threshold: float = 0.5,
                 sim_threshold: float = 0.5) -> int:
    """GLaMM's mask-recall matches for one image (see the module docstring): greedy on IoU (GT rows, prediction
    columns), accept while IoU >= ``iou_threshold`` and phrase similarity >= ``sim_threshold``, stop at the first
    failure. Phrase k goes with mask k; an index past the end of either list (more masks than phrases) makes the
    image score 0, as the official ``try``/``except`` does."""
    ious = iou_matrix(gt_masks, pred_masks)
    sims = np.array([[similarity(g, p) for p in pred_phrases] for g in gt_phrases],
                    dtype=np.float64).reshape(len(gt_phrases), len(pred_phrases))
    matches = 0
    try:
        while ious.size:
            i, j = np.unravel_index(np.argmax(ious), ious.shape)
            if ious[i, j] < iou_threshold or sims[i, j] < sim_threshold:
                break
            matches += 1
            ious[i, :] = 0
            ious[:, j] = 0
            sims[i, :] = 0
            sims[:, j] = 0
    except IndexError:
        return 0
    return matches


def ap50(gt_dict: dict, image_ids: Sequence, predictions: dict[Any, list]) -> float:
    """AP at IoU 0.5 of pycocotools' ``COCOeval(..., "segm")`` on category 1 over ``image_ids``; ``predictions``
    maps image id -> list of COCO RLEs (each scored 1.0). NaN when there is nothing to evaluate."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keep = set(image_ids)
    gt = {"images": [im for im in gt_dict["images"] if im["id"] in keep],
          "annotations": [dict(a, iscrowd=a.get("iscrowd", 0), category_id=a.get("category_id", 1))
                          for a in gt_dict["annotations"] if a["image_id"] in keep],
          "categories": gt_dict.get("categories") or [{"id": 1, "name": "object"}]}
    for k, a in enumerate(gt["annotations"]):
        a.setdefault("id", k + 1)
        if "area" not in a:
            h, w = _size(gt["images"], a["image_id"])
            a["area"] = float(decode_segmentation(a["segmentation"], h, w, "gt").sum())
    dets = [{"image_id": iid, "category_id": 1, "segmentation": rle, "score": 1.0}
            for iid in image_ids for rle in predictions.get(iid, [])]
    if not dets or not gt["annotations"]:
        return 0.0 if gt["annotations"] else float("nan")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes(dets)
        ev = COCOeval(coco, res, "segm")
        ev.params.catIds = [1]
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[1]), 0.0)  # -1 = no GT


def _size(images: list, iid) -> tuple[int, int]:
    for im in images:
        if im["id"] == iid:
            return int(im["height"]), int(im["width"])
    raise InputError(f"image id {iid!r} has no size")


class TextEncoder:
    """Sentence similarity for mask recall: cosine of mean-pooled last hidden states (special tokens included, as
    GLaMM does with bert-base-uncased) of a transformers encoder loaded from ``path``."""

    def __init__(self, path: str | Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = str(path)
        if not Path(path).is_dir():
            raise InputError(f"--text-encoder {path}: not a folder (give a local transformers encoder, e.g. "
                             "bert-base-uncased downloaded with huggingface-cli)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).eval()
        except Exception as e:
            raise InputError(f"--text-encoder {path}: cannot load ({type(e).__name__}: {str(e)[:120]})") from None
        self._torch = torch
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, text: str) -> np.ndarray:
        if text not in self._cache:
            with self._torch.no_grad():
                inputs = self.tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
                self._cache[text] = self.model(**inputs).last_hidden_state[0].mean(0).float().numpy()
        return self._cache[text]

    def similarity(self, a: str, b: str) -> float:
        x, y = self.embed(a), self.embed(b)
        denom = float(np.linalg.norm(x) * np.linalg.norm(y))
        return float(x @ y / denom) if denom else 0.0


class WordOverlap:
    """An offline stand-in for the text encoder (``--text-encoder words``): cosine of the two phrases' lower-cased
    word counts. "a red circle" / "a red circle" = 1, "a red circle" / "a red square" = 0.67, "a red circle" /
    "a blue square" = 0.33. Not the official measure (bert-base-uncased), so the report names it."""

    path = "words (bag-of-words cosine; officially bert-base-uncased)"

    @staticmethod
    def similarity(a: str, b: str) -> float:
        from collections import Counter

        x, y = Counter(re.findall(r"[a-z0-9]+", a.lower())), Counter(re.findall(r"[a-z0-9]+", b.lower()))
        denom = float(np.sqrt(sum(v * v for v in x.values()) * sum(v * v for v in y.values())))
        return sum(x[w] * y[w] for w in x) / denom if denom else 0.0


def text_encoder_for(spec: str | None):
    """``--text-encoder``: a transformers encoder folder, ``words`` (:class:`WordOverlap`), or None (no recall)."""
    if not spec:
        return None
    return WordOverlap() if spec == "words" else TextEncoder(spec)


def score_gcg(images: list[GcgImage], gt_dict: dict, predictions: dict[Any, dict],
              text_encoder: TextEncoder | WordOverlap | None) -> dict[str, Any]:
    """All GCG metrics over ``images``; ``predictions[image_id]`` = ``{"caption", "phrases", "pred_masks"}``."""
    mious, tp, positives, per_image = [], 0, 0, []
    for g in images:
        p = predictions[g.image_id]
        gt_masks = g.masks()
        pred = [decode_segmentation(r, g.height, g.width, f"prediction for image {g.image_id!r}")
                for r in p["pred_masks"]]
        for m in pred:
            if m.shape != (g.height, g.width):
                raise InputError(f"prediction for image {g.image_id!r}: mask size {list(m.shape)} differs from the "
                                 f"image size {[g.height, g.width]}")
        miou = greedy_miou(pred, gt_masks)
        mious.append(miou)
        positives += len(g.phrases)
        pairs = None
        if text_encoder is not None:
            pairs = recall_pairs(gt_masks, g.phrases, pred, p["phrases"], text_encoder.similarity)
            tp += pairs
        per_image.append({"image_id": g.image_id, "miou": miou, "recall_pairs": pairs, "gt_phrases": len(g.phrases)})
    report: dict[str, Any] = {
        "AP50": ap50(gt_dict, [g.image_id for g in images], {k: v["pred_masks"] for k, v in predictions.items()}),
        "mIoU": float(np.mean(mious)) if mious else float("nan"),
        "recall": (tp / positives if positives else 0.0) if text_encoder is not None else None,
        "recall_text_encoder": text_encoder.path if text_encoder is not None else None,
    }
    report.update(_caption_report({g.image_id: g.captions for g in images},
                                  {g.image_id: predictions[g.image_id]["caption"] for g in images}))
    report["per_image"] = per_image
    return report


def _caption_report(references: dict, candidates: dict) -> dict[str, Any]:
    try:
        scores = caption_metrics(references, candidates)
        return {**scores, "caption_scorer": caption_backend()}
    except CaptionMetricsUnavailable as e:
        return {"METEOR": None, "CIDEr": None, "caption_scorer": None, "caption_metrics_error": str(e)}


# ------------------------------------------------------------------------------------------ runs

def gcg_record(image_id: Any, text: str, masks: np.ndarray) -> dict[str, Any]:
    """What GLaMM's GCG inference keeps of one answer: the cleaned caption, the phrases (every ``<p>...</p>``,
    stripped, in order) and the masks as COCO RLE, mask k belonging to phrase k."""
    from ..grounding.glamm import clean_caption

    return {"sent_id": image_id, "image_id": image_id, "text": text, "caption": clean_caption(text),
            "phrases": [p.strip() for p in _PHRASE.findall(text.replace("\n", ""))],
            "pred_masks": [mask_to_rle(m) for m in masks]}


def _run(out: str | None, run: dict, resume: bool, items: list, key: Callable, predict: Callable, progress: bool,
         desc: str) -> dict[Any, dict]:
    """Predict every item not already in ``out``'s log; returns {key: record} for all of them."""
    from tqdm import tqdm

    log = None
    if out:
        _, log = start_run(out, run, resume)
    done = dict(log.done) if log is not None else {}
    try:
        for item in tqdm(items, disable=not progress, desc=desc, unit="img"):
            k = key(item)
            if k in done:
                continue
            rec = predict(item)
            done[k] = rec
            if log is not None:
                log.write(rec)
    finally:
        if log is not None:
            log.close()
    return done


def evaluate_gcg(model, data_root: str, split: str = "val", image_dir: str | None = None, limit: int | None = None,
                 out: str | None = None, resume: bool = False, progress: bool = True, text_encoder: str | None = None,
                 model_name: str | None = None, max_new_tokens: int = 512, **_: Any) -> dict[str, Any]:
    """Run GCG on every image of the split and score it. Returns the report (also ``out/report.json``)."""
    if dist_info()[1] > 1:
        raise InputError("eval gcg runs in one process; launch it without accelerate")
    clock = Clock()
    images, gt = load_gcg_split(data_root, split, limit)
    root = Path(data_root)
    paths = {g.image_id: find_image(root, image_dir, g.file_name) for g in images}
    encoder = text_encoder_for(text_encoder)
    if not getattr(model.config, "gcg_prompt", None):
        raise InputError(f"eval gcg: the {model.family} family has no grounded conversation generation; use a GLaMM "
                         "model")

    def predict(g: GcgImage) -> dict:
        res = model.segment(paths[g.image_id], model.config.gcg_prompt, max_new_tokens=max_new_tokens)[0]
        seg = [k for k, s in enumerate(res.sources) if s == "seg"]
        return gcg_record(g.image_id, res.text, res.masks[seg] if len(seg) else res.masks[:0])

    run = {"task": "gcg", "data_root": str(Path(data_root).resolve()), "split": split, "limit": limit,
           "model": model_name}
    preds = _run(out, run, resume, images, lambda g: g.image_id, predict, progress, f"gcg {split}")
    report = {"task": "gcg", "split": split, "model": model_name, "num_images": len(images),
              **score_gcg(images, gt, preds, encoder), "seconds": clock()}
    if out and dist_info()[0] == 0:
        save_json(Path(out) / "report.json", report)
    return report


@dataclass
class RegionSample:
    key: Any
    file_name: str
    box_xyxy: tuple[float, float, float, float]
    captions: list[str]


def load_regcap(path: str | Path, limit: int | None = None) -> list[RegionSample]:
    """A region-caption file (GLaMM's COCO style: ``images`` with ``file_name``, ``annotations`` with ``image_id``,
    ``bbox`` xywh and ``caption``): one sample per annotation."""
    path = Path(path)
    data = _read(path, "region-caption ground truth")
    files = {}
    for k, im in enumerate(data["images"]):
        files[_field(im, "id", path, f"images[{k}]")] = str(_field(im, "file_name", path, f"images[{k}]"))
    out = []
    for k, a in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        iid = _field(a, "image_id", path, where)
        box = _field(a, "bbox", path, where)
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)) \
                or box[2] <= 0 or box[3] <= 0:
            raise InputError(f"{path}: {where}['bbox'] = {box!r}: expected [x, y, w, h] with w, h > 0")
        if iid not in files:
            raise InputError(f"{path}: {where} refers to unknown image id {iid!r}")
        cap = _field(a, "caption", path, where)
        x, y, w, h = (float(v) for v in box)
        out.append(RegionSample(a.get("id", k), files[iid], (x, y, x + w, y + h), [str(cap)]))
    if not out:
        raise InputError(f"{path}: no annotations")
    return out[:limit] if limit else out


def exact_match(gts: dict[Any, list[str]], preds: dict[Any, str]) -> float:
    """Share of regions whose caption equals one of its references, ignoring case and punctuation (a stricter
    companion to METEOR/CIDEr: on the shapes world it means size, colour and shape all named right)."""
    norm = lambda t: " ".join(re.findall(r"[a-z0-9]+", t.lower()))  # noqa: E731
    if not gts:
        return float("nan")
    return sum(any(norm(preds[k]) == norm(c) for c in caps) for k, caps in gts.items()) / len(gts)


def attribute_accuracy(gts: dict[Any, list[str]], preds: dict[Any, str],
                       image_of: dict[Any, Any] | None = None) -> dict[str, float] | None:
    """Shares of regions whose caption names the colour, the shape and the size its reference names, and both
    colour and shape, in the shapes world's words (``datasets.shapes``: COLORS, SHAPES, SIZES; plurals count).
    A region counts for an attribute when its first reference names exactly one word of it; a caption is right
    when it names that word and no other of the same attribute. None when no reference uses those words.

    With ``image_of`` (region key -> its image), ``colour_and_shape_of_any_region`` is the share of the regions
    counted for ``colour_and_shape`` whose caption names the colour and shape of *some* region of the same image:
    far above ``colour_and_shape``, it says the model describes the image rather than the box."""
    from ..datasets.shapes import COLORS, SHAPES, SIZES

    groups = {"colour": set(COLORS), "shape": set(SHAPES), "size": set(SIZES)}

    def named(text: str, vocab: set[str]) -> set[str]:
        out = set()
        for w in re.findall(r"[a-z]+", text.lower()):
            w = w[:-1] if w not in vocab and w.endswith("s") and w[:-1] in vocab else w
            if w in vocab:
                out.add(w)
        return out

    right = {g: [] for g in (*groups, "colour_and_shape")}
    for k, caps in gts.items():
        if not caps:
            continue
        ok = {}
        for g, vocab in groups.items():
            ref = named(caps[0], vocab)
            if len(ref) == 1:
                ok[g] = named(preds.get(k, ""), vocab) == ref
                right[g].append(ok[g])
        if "colour" in ok and "shape" in ok:
            right["colour_and_shape"].append(ok["colour"] and ok["shape"])
    if not any(right.values()):
        return None
    out = {g: (sum(v) / len(v) if v else None) for g, v in right.items()}
    if image_of is not None:
        def pair(text: str) -> tuple | None:
            c, s = named(text, groups["colour"]), named(text, groups["shape"])
            return (*c, *s) if len(c) == 1 and len(s) == 1 else None

        refs = {k: pair(caps[0]) for k, caps in gts.items() if caps}
        refs = {k: p for k, p in refs.items() if p}
        in_image: dict[Any, set] = {}
        for k, p in refs.items():
            in_image.setdefault(image_of[k], set()).add(p)
        hits = [pair(preds.get(k, "")) in in_image[image_of[k]] for k in refs]
        out["colour_and_shape_of_any_region"] = sum(hits) / len(hits) if hits else None
    return out


def evaluate_regcap(model, data_root: str, split: str = "val", dataset: str | None = None,
                    image_dir: str | None = None, limit: int | None = None, out: str | None = None,
                    resume: bool = False, progress: bool = True, model_name: str | None = None,
                    max_new_tokens: int = 128, **_: Any) -> dict[str, Any]:
    """Describe every annotated box with GLaMM's region question; METEOR/CIDEr of the cleaned answers.
    The file is ``DATA_ROOT/DATASET`` (e.g. ``finetune_refcocog_val_captions.json``) or, without ``dataset``,
    ``DATA_ROOT/{split}_regcap_coco_caption_gt.json`` (what ``groundseg data shapes`` writes)."""
    from ..grounding.glamm import clean_caption

    if not getattr(model, "supports_regions", False):
        raise InputError(f"eval regcap: the {model.family} family has no region encoder; use a GLaMM model")
    clock = Clock()
    root = Path(data_root)
    path = root / (dataset or REGCAP_FILE.format(split=split))
    samples = load_regcap(path, limit)

    def predict(s: RegionSample) -> dict:
        res = model.segment(find_image(root, image_dir, s.file_name), model.config.region_prompt,
                            boxes=[s.box_xyxy], max_new_tokens=max_new_tokens)[0]
        return {"sent_id": s.key, "text": res.text, "caption": clean_caption(res.text)}

    run = {"task": "regcap", "annotations": str(path.resolve()), "limit": limit, "model": model_name}
    preds = _run(out, run, resume, samples, lambda s: s.key, predict, progress, "regcap")
    report = {"task": "regcap", "annotations": str(path), "model": model_name, "num_regions": len(samples),
              "exact_match": exact_match({s.key: s.captions for s in samples},
                                         {s.key: preds[s.key]["caption"] for s in samples}),
              "attribute_accuracy": attribute_accuracy({s.key: s.captions for s in samples},
                                                       {s.key: preds[s.key]["caption"] for s in samples},
                                                       {s.key: s.file_name for s in samples}),
              **_caption_report({s.key: s.captions for s in samples}, {s.key: preds[s.key]["caption"]
                                                                      for s in samples}),
              "seconds": clock()}
    if out and dist_info()[0] == 0:
        save_json(Path(out) / "report.json", report)
    return report


# ------------------------------------------------------------------------------------------ GranD-f training files

@dataclass
class GcgSample:
    """One grounded caption for training: ``phrases`` in caption order, each with its character span and its
    segmentations (COCO RLE or polygons; several are united into one mask)."""

    file_name: str
    caption: str
    phrases: list[str]
    spans: list[tuple[int, int]]
    segmentations: list[list]
    height: int | None = None
    width: int | None = None


GRANDF_FORMATS = ("GranDf_HA", "OpenPSG", "RefCOCOg_GCG", "Flickr")


def load_grandf(path: str | Path, fmt: str) -> list[GcgSample]:
    """Read a GranD-f training annotation file (``GranDf_HA_GCG_train.json``, ``OpenPsgGCG_{train,val}.json``,
    ``RefCOCOg_GCG_{train,val}.json``, ``flickr_mergedGT_GCG_{train,val}.json``; reference/glamm.md §4.3)."""
    path = Path(path)
    if fmt not in GRANDF_FORMATS:
        raise InputError(f"GranD-f format {fmt!r}: expected one of {', '.join(GRANDF_FORMATS)}")
    if not path.is_file():
        raise InputError(f"{path}: not found")
    data = read_json(path)
    if fmt in ("GranDf_HA", "OpenPSG"):
        return [_grandf_ha(e, path, k) for k, e in enumerate(_as_list(data, path))]
    if fmt == "RefCOCOg_GCG":
        out = []
        for k, e in enumerate(_as_list(data, path)):
            if not isinstance(e, dict) or len(e) != 1:
                raise InputError(f"{path}: entry {k}: expected {{id: {{img_file_name, caption, refs}}}}")
            out.append(_refcocog_gcg(next(iter(e.values())), path, k))
        return out
    return _flickr(data, path)


def _as_list(data, path: Path) -> list:
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of entries")
    return data


def _grandf_ha(e: dict, path: Path, k: int) -> GcgSample:
    where = f"entry {k}"
    caption = _field(e, "caption", path, where)
    groundings = _field(e, "groundings", path, where)
    if not isinstance(groundings, dict):
        raise InputError(f"{path}: {where}['groundings'] must map phrase -> {{token_positives, rle_masks}}")
    items = []
    for phrase, g in groundings.items():
        at = f"{where} phrase {phrase!r}"
        span = _field(g, "token_positives", path, at)
        items.append((tuple(int(v) for v in span), phrase, list(_field(g, "rle_masks", path, at))))
    items.sort(key=lambda t: t[0][0])
    return GcgSample(str(_field(e, "file_name", path, where)), caption, [p for _, p, _ in items],
                     [s for s, _, _ in items], [m for _, _, m in items])


def _refcocog_gcg(e: dict, path: Path, k: int) -> GcgSample:
    where = f"entry {k}"
    caption = str(_field(e, "caption", path, where))
    low = caption.lower()
    items = []
    for r, ref in enumerate(_field(e, "refs", path, where)):
        sent = str(_field(ref, "sentence", path, f"{where} refs[{r}]"))
        start = low.find(sent.lower())
        if start < 0:
            continue
        items.append(((start, start + len(sent)), caption[start:start + len(sent)],
                      [_field(ref, "segmentation", path, f"{where} refs[{r}]")]))
    items.sort(key=lambda t: t[0][0])
    kept, last_end = [], -1
    for (s, t), phrase, seg in items:  # overlapping spans: trim to start after the previous one
        if s < last_end:
            s = last_end
            if s >= t:
                continue
            phrase = caption[s:t]
        kept.append(((s, t), phrase.strip(), seg))
        last_end = t
    return GcgSample(str(_field(e, "img_file_name", path, where)), caption, [p for _, p, _ in kept],
                     [s for s, _, _ in kept], [m for _, _, m in kept])


def _flickr(data, path: Path) -> list[GcgSample]:
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InputError(f"{path}: expected a COCO-style object with 'images' and 'annotations' (Flickr GCG)")
    anns: dict[Any, list] = {}
    for k, a in enumerate(data["annotations"]):
        anns.setdefault(_field(a, "image_id", path, f"annotations[{k}]"), []).append(a)
    out = []
    for k, im in enumerate(data["images"]):
        where = f"images[{k}]"
        caption = str(_field(im, "caption", path, where))
        if len(caption.split()) < 3:  # as GLaMM's Flickr loader
            continue
        items = []
        for a in anns.get(_field(im, "id", path, where), []):
            for s, t in _field(a, "tokens_positive", path, f"annotations of {where}"):
                items.append(((int(s), int(t)), caption[int(s):int(t)], [_field(a, "sam_mask", path, where)]))
        items.sort(key=lambda t: t[0][0])
        out.append(GcgSample(str(_field(im, "file_name", path, where)), caption, [p for _, p, _ in items],
                             [s for s, _, _ in items], [m for _, _, m in items], int(im.get("height", 0)) or None,
                             int(im.get("width", 0)) or None))
    return out


def grounded_answer(sample: GcgSample) -> str:
    """The caption with each grounded span rewritten ``<p> phrase </p> [SEG]`` (GLaMM's GCG target)."""
    out, pos = [], 0
    for (s, t) in sample.spans:
        out.append(sample.caption[pos:s])
        out.append(f"<p> {sample.caption[s:t].strip()} </p> [SEG]")
        pos = t
    out.append(sample.caption[pos:])
    return "".join(out)

