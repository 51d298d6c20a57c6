"""REFER-format referring-expression datasets: RefCOCO, RefCOCO+, RefCOCOg, gRefCOCO-style refs, and the shapes world.

A dataset folder holds ``refs(<split_by>).p`` (a pickled list of refs) and ``instances.json`` (COCO images,
annotations, categories)::

    <data_root>/<dataset>/refs(<split_by>).p      e.g. refcoco/refs(unc).p, refcocog/refs(umd).p
    <data_root>/<dataset>/instances.json

A ref is a plain dict::

    {"ref_id": int, "ann_id": int | [int, ...], "image_id": int, "split": "train" | "val" | "test" | ...,
     "sent_ids": [int, ...], "category_id": int | [int, ...], "file_name": "<image stem>_<ann_id>.jpg",
     "sentences": [{"sent_id": int, "raw": str, "sent": str, "tokens": [str, ...], "kind": str (optional)}]}

``ann_id`` is a list for multi-target refs (gRefCOCO style; ``[-1]`` means "no target"). The pickle is untrusted input:
it is read with :class:`RestrictedUnpickler`, which refuses every global, so it can build only the plain containers and
scalars such files hold and can never call a function.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from pycocotools import mask as mask_utils

from groundseg.io import InputError, read_json, rle_to_mask

__all__ = ["RestrictedUnpickler", "load_refs_pickle", "ReferSample", "Refer", "load_refer"]

PathLike = Union[str, os.PathLike]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global (class or function reference).

    dict, list, tuple, str, bytes, int, float, bool and None are built by dedicated opcodes that never consult
    ``find_class``, so REFER pickles load; anything that would import a name (``os.system`` via ``__reduce__``, a
    class instance, even ``set`` under protocol 2) raises :class:`~groundseg.io.InputError` naming the file and the
    global, before anything is called.
    """

    def __init__(self, file, source: str = "pickle") -> None:
        # Python 2 pickles store byte strings; decode them as UTF-8 text like Python 3 REFER ports expect.
        super().__init__(file, encoding="utf-8")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        raise InputError(
            f"{self._source}: refusing to load global {module}.{name} "
            "(REFER pickles may contain only lists, dicts, strings and numbers)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise InputError(f"{self._source}: refusing persistent id {pid!r} in a REFER pickle")


def load_refs_pickle(path: PathLike) -> list[dict]:
    """Read a REFER ``refs(*).p`` file safely (see :class:`RestrictedUnpickler`).

    Raises:
        InputError: the file is missing, refers to a global, is not a valid pickle, or is not a list of dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"REFER refs file not found: {path}")
    with open(path, "rb") as f:
        try:
            refs = RestrictedUnpickler(f, str(path)).load()
        except InputError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not a readable REFER pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise InputError(f"{path} must hold a list of ref dicts, got {type(refs).__name__}")
    return refs


@dataclass(frozen=True)
class ReferSample:
    """One sentence of one ref, with what is needed to load its image and mask.

    ``file_name``, ``height`` and ``width`` are the image's (from ``instances.json``), not the ref's ``file_name``
    (which REFER suffixes with the annotation id). ``sentence`` is the normalised ``sent`` (``raw`` keeps the
    original casing and punctuation); ``kind`` is the expression kind where the dataset records one (shapes world),
    else None.
    """

    image_id: int
    file_name: str
    height: int
    width: int
    ref_id: int
    ann_ids: tuple[int, ...]
    sentence: str
    kind: str | None
    sent_id: int = -1
    raw: str = ""


class Refer:
    """An indexed REFER dataset (see :func:`load_refer`).

    Attributes:
        refs: the ref dicts, in file order.
        refs_by_id: ``ref_id`` -> ref.
        anns: annotation id -> COCO annotation dict.
        images: image id -> COCO image dict (``file_name``, ``height``, ``width``, ...).
        categories: category id -> COCO category dict.
    """

    def __init__(self, refs: list[dict], instances: dict, source: str = "") -> None:
        self.source = source
        self.refs = refs
        self.refs_by_id = {r["ref_id"]: r for r in refs}
        self.anns = {a["id"]: a for a in instances.get("annotations", [])}
        self.images = {im["id"]: im for im in instances.get("images", [])}
        self.categories = {c["id"]: c for c in instances.get("categories", [])}

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def splits(self) -> list[str]:
        """The split names present, sorted."""
        return sorted({r["split"] for r in self.refs})

    def refs_for_split(self, split: str | None = None) -> list[dict]:
        """Refs of one split (``"train"``, ``"val"``, ``"test"``, ``"testA"``, ...); all refs for None."""
        return [r for r in self.refs if split is None or r["split"] == split]

    @staticmethod
    def ann_ids(ref: dict) -> tuple[int, ...]:
        """Annotation ids of a ref, whether ``ann_id`` is an int or a list; gRefCOCO's no-target ``-1`` is dropped."""
        ids = ref["ann_id"] if isinstance(ref["ann_id"], (list, tuple)) else [ref["ann_id"]]
        return tuple(int(a) for a in ids if int(a) >= 0)

    def image_of(self, ref: dict) -> dict:
        """The COCO image dict of a ref."""
        try:
            return self.images[ref["image_id"]]
        except KeyError:
            raise InputError(
                f"{self.source}: ref {ref.get('ref_id')} names image {ref['image_id']}, absent from instances.json"
            ) from None

    def ann_mask(self, ann_id: int) -> np.ndarray:
        """``(H, W)`` bool mask of one annotation, decoded at its image's height and width."""
        try:
            ann = self.anns[ann_id]
        except KeyError:
            raise InputError(f"{self.source}: annotation {ann_id} is absent from instances.json") from None
        image = self.images.get(ann["image_id"])
        if image is None:
            raise InputError(f"{self.source}: annotation {ann_id} names image {ann['image_id']}, absent")
        return _decode_segmentation(ann["segmentation"], int(image["height"]), int(image["width"]),
                                    f"{self.source}: annotation {ann_id}")

    def mask(self, ref: dict) -> np.ndarray:
        """``(H, W)`` bool union of the masks of a ref's annotations (all False for a no-target ref)."""
        image = self.image_of(ref)
        out = np.zeros((int(image["height"]), int(image["width"])), bool)
        for ann_id in self.ann_ids(ref):
            out |= self.ann_mask(ann_id)
        return out

    def sentences(self, split: str | None = None) -> Iterator[ReferSample]:
        """Every sentence of the refs of ``split`` (all splits for None), ref by ref in file order."""
        for ref in self.refs_for_split(split):
            image = self.image_of(ref)
            ann_ids = self.ann_ids(ref)
            for sent in ref["sentences"]:
                yield ReferSample(
                    image_id=ref["image_id"], file_name=image["file_name"], height=int(image["height"]),
                    width=int(image["width"]), ref_id=ref["ref_id"], ann_ids=ann_ids, sentence=sent["sent"],
                    kind=sent.get("kind"), sent_id=sent.get("sent_id", -1), raw=sent.get("raw", sent["sent"]),
                )


def _decode_segmentation(seg: Any, h: int, w: int, where: str) -> np.ndarray:
    """COCO segmentation (polygons, or RLE with compressed or list counts) -> ``(h, w)`` bool."""
    if isinstance(seg, list):
        # Polygons [[x1, y1, x2, y2, ...], ...]; pycocotools needs >= 3 points per polygon.
        polygons = [[float(v) for v in p] for p in seg if len(p) >= 6]
        if not polygons:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        return mask_utils.decode(rle).astype(bool)
    if isinstance(seg, dict):
        m = rle_to_mask(seg)
        if m.shape != (h, w):
            raise InputError(f"{where}: RLE size {list(m.shape)} differs from the image size [{h}, {w}]")
        return m
    raise InputError(f"{where}: segmentation must be polygons or RLE, got {type(seg).__name__}")


def _refs_file(folder: Path, split_by: str | None) -> Path:
    if split_by is not None:
        for name in (f"refs({split_by}).p", f"grefs({split_by}).p", f"grefs({split_by}).json"):
            if (folder / name).is_file():
                return folder / name
        raise InputError(f"REFER refs file not found: {folder / f'refs({split_by}).p'}")
    found = sorted(p for pattern in ("refs(*).p", "grefs(*).p", "grefs(*).json") for p in folder.glob(pattern))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise InputError(f"{folder}: pass split_by to choose one refs file (found: {names})")
    return found[0]


def load_refer(data_root: PathLike, dataset: str | None = None, split_by: str | None = None) -> Refer:
    """Load a REFER dataset.

    Args:
        data_root: folder holding dataset folders (``refcoco/``, ``refcocog/``, ``shapes/``...), or the dataset
            folder itself when ``dataset`` is None.
        dataset: sub-folder name, e.g. ``"refcocog"``.
        split_by: the refs file ``refs(<split_by>).p``, e.g. ``"unc"``, ``"umd"``, ``"google"``; may be omitted
            when the folder holds exactly one refs file. ``grefs(<split_by>).p``/``.json`` (gRefCOCO) are also
            found.

    Example:
        >>> refer = load_refer("data", "refcocog", "umd")          # data/refcocog/refs(umd).p
        >>> refer = load_refer("out/shapes")                        # written by write_shapes

    Raises:
        InputError: a folder or file is missing or unreadable, or the pickle refers to any global.
    """
    folder = Path(data_root) / dataset if dataset else Path(data_root)
    if not folder.is_dir():
        raise InputError(f"REFER dataset folder not found: {folder}")
    refs_path = _refs_file(folder, split_by)
    if refs_path.suffix == ".json":
        refs = read_json(refs_path)
        refs = refs.get("refs", refs) if isinstance(refs, dict) else refs
        if not isinstance(refs, list):
            raise InputError(f"{refs_path} must hold a list of refs")
    else:
        refs = load_refs_pickle(refs_path)
    instances_path = folder / "instances.json"
    if not instances_path.is_file():
        raise InputError(f"COCO instances file not found: {instances_path}")
    instances = read_json(instances_path)
    if not isinstance(instances, dict):
        raise InputError(f"{instances_path} must hold a COCO dict with images and annotations")
    missing = [k for r in refs[:1] for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in r]
    if missing:
        raise InputError(f"{refs_path}: refs lack keys {missing}")
    return Refer(refs, instances, source=str(refs_path))
