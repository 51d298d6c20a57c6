"""Tests for the REFER loader: the real RefCOCOg (umd) sample, gRefCOCO-style refs, and refusing malicious pickles."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import SHARED, need
from pycocotools import mask as mask_utils

from groundseg.datasets.refer import load_refer, load_refs_pickle
from groundseg.io import InputError, mask_to_bbox, mask_to_rle

SAMPLE = SHARED / "fixtures" / "refcoco-umd-sample"


@pytest.fixture(scope="module")
def sample_dir():
    return need(SAMPLE)


def test_real_refcocog_sample_loads(sample_dir):
    # As data_root + dataset + split_by, and as the dataset folder itself (its only refs file is found).
    refer = load_refer(sample_dir.parent, sample_dir.name, "umd")
    again = load_refer(sample_dir)
    assert again.refs == refer.refs

    # Counts stated in ../shared/fixtures/README.md.
    assert len(refer.refs) == 15
    assert {s: len(refer.refs_for_split(s)) for s in refer.splits} == {"train": 5, "val": 5, "test": 5}
    assert len(list(refer.sentences())) == 28
    assert sum(len(list(refer.sentences(s))) for s in ("train", "val", "test")) == 28
    assert len(refer.anns) == 108 and len(refer.images) == 15

    first = next(refer.sentences("train"))
    ref = refer.refs_by_id[first.ref_id]
    assert first.sentence == ref["sentences"][0]["sent"] and first.kind is None
    assert first.ann_ids == (ref["ann_id"],)
    assert first.file_name == refer.images[ref["image_id"]]["file_name"] and first.file_name.endswith(".jpg")


def test_real_sample_masks_decode_at_image_size(sample_dir):
    refer = load_refer(sample_dir.parent, sample_dir.name, "umd")
    for ref in refer.refs:
        image = refer.images[ref["image_id"]]
        ann = refer.anns[ref["ann_id"]]
        m = refer.mask(ref)
        assert m.shape == (image["height"], image["width"]) and m.dtype == bool
        # The union of the annotation's polygons, as pycocotools rasterises them.
        rles = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
        assert np.array_equal(m, mask_utils.decode(mask_utils.merge(rles)).astype(bool))
        assert abs(m.sum() - ann["area"]) <= 0.05 * ann["area"]
        x, y, w, h = mask_to_bbox(m)
        assert np.allclose([x, y, x + w, y + h], [ann["bbox"][0], ann["bbox"][1],
                                                  ann["bbox"][0] + ann["bbox"][2], ann["bbox"][1] + ann["bbox"][3]],
                           atol=4.0)  # thin polygon tips can fall between pixel centers


def _mini_dataset(folder, refs):
    """A one-image dataset whose two annotations are RLE squares."""
    folder.mkdir(parents=True, exist_ok=True)
    a = np.zeros((20, 30), bool)
    a[2:6, 3:9] = True
    b = np.zeros((20, 30), bool)
    b[10:15, 20:28] = True
    instances = {
        "images": [{"id": 1, "file_name": "img.jpg", "height": 20, "width": 30}],
        "annotations": [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(a), "iscrowd": 0,
                         "bbox": mask_to_bbox(a), "area": int(a.sum())},
                        {"id": 12, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(b), "iscrowd": 0,
                         "bbox": mask_to_bbox(b), "area": int(b.sum())}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return a, b


def test_multi_target_and_no_target_refs(tmp_path):
    sent = {"sent_id": 1, "raw": "both", "sent": "both", "tokens": ["both"]}
    refs = [
        {"ref_id": 1, "ann_id": [11, 12], "image_id": 1, "split": "train", "sent_ids": [1], "sentences": [sent],
         "category_id": [1, 1], "file_name": "img_11.jpg"},
        {"ref_id": 2, "ann_id": [-1], "image_id": 1, "split": "val", "sent_ids": [2],
         "sentences": [{**sent, "sent_id": 2}], "category_id": [], "file_name": "img_-1.jpg"},
    ]
    a, b = _mini_dataset(tmp_path / "mini", refs)
    refer = load_refer(tmp_path, "mini", "unc")
    assert np.array_equal(refer.mask(refer.refs[0]), a | b)
    assert not refer.mask(refer.refs[1]).any()
    (s,) = refer.sentences("train")
    assert s.ann_ids == (11, 12) and (s.height, s.width) == (20, 30)


class _RunsCommand:
    """Pickles to a call of os.system: what a booby-trapped refs file would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    _mini_dataset(tmp_path / "evil", [])
    path = tmp_path / "evil" / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _RunsCommand(f"touch {marker}")}], protocol=2))
    with pytest.raises(InputError) as err:
        load_refer(tmp_path, "evil", "unc")
    message = str(err.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # "posix.system" on Linux
    assert not marker.exists()

    # Any global at all is refused, even a harmless one.
    path.write_bytes(pickle.dumps([{"ref_id": 1, "ids": {1, 2}}], protocol=2))  # protocol 2 sets need builtins.set
    with pytest.raises(InputError, match=r"(__builtin__|builtins)\.set"):
        load_refs_pickle(path)


def test_missing_or_broken_files_give_clear_errors(tmp_path, sample_dir):
    with pytest.raises(InputError, match="folder not found"):
        load_refer(tmp_path, "absent", "unc")
    folder = tmp_path / "copy"
    shutil.copytree(sample_dir, folder)
    with pytest.raises(InputError, match=r"refs\(unc\)\.p"):
        load_refer(folder, split_by="unc")
    (folder / "instances.json").unlink()
    with pytest.raises(InputError, match="instances.json"):
        load_refer(folder, split_by="umd")
    shutil.copy(sample_dir / "instances.json", folder / "instances.json")
    shutil.copy(folder / "refs(umd).p", folder / "refs(google).p")
    with pytest.raises(InputError, match="pass split_by"):
        load_refer(folder)
    (folder / "refs(google).p").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(InputError, match="not a readable REFER pickle"):
        load_refer(folder, split_by="google")


def test_shapes_written_split_counts_and_masks(tmp_path):
    """The loader's counts on a split written by the shapes world equal the writer's own summary, and every RLE
    annotation decodes to its recorded `area`."""
    from collections import Counter

    from groundseg.datasets.shapes import write_shapes

    summary = write_shapes(tmp_path, seed=9, images=12, image_size=80)
    refer = load_refer(tmp_path, "shapes", "unc")
    assert len(refer.refs) == summary["refs"] and len(refer.anns) == summary["annotations"]
    samples = list(refer.sentences())
    assert len(samples) == summary["sentences"] == len({s.sent_id for s in samples})
    assert dict(Counter(s.kind for s in samples)) == summary["kinds"]
    images_per_split = {sp: len({r["image_id"] for r in refer.refs_for_split(sp)}) for sp in refer.splits}
    assert images_per_split == {k: v for k, v in summary["splits"].items() if v}
    for ann_id, ann in refer.anns.items():
        assert int(refer.ann_mask(ann_id).sum()) == ann["area"]
    for s in samples[:20]:
        m = refer.mask(refer.refs_by_id[s.ref_id])
        assert m.shape == (s.height, s.width) and m.any()
