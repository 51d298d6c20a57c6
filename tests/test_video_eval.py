"""J, F and J&F on hand-made masks, F against an independent boundary computation, the four dataset layouts,
and ``groundseg eval video`` with ``--predictions``, ``--out`` and ``--resume``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from groundseg.eval.video import (ExpressionScore, boundary_f, boundary_map, evaluate_video, load_video_dataset,
                                  region_j, score_frames, summarize)
from groundseg.io import InputError, mask_to_rle
from groundseg.video import save_label_png


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------------- J

def test_j_hand_computed():
    a, b = box(10, 10, 0, 4, 0, 4), box(10, 10, 2, 6, 2, 6)  # 16 and 16 pixels, overlap 4
    assert region_j(a, b) == pytest.approx(4 / 28)
    assert region_j(a, a) == 1.0
    empty = np.zeros((10, 10), bool)
    assert region_j(empty, empty) == 1.0  # both empty
    assert region_j(a, empty) == 0.0 and region_j(empty, a) == 0.0


# ------------------------------------------------------------------------------------------- F

def test_boundary_map_of_a_square():
    m = box(6, 6, 1, 4, 1, 4)  # rows/cols 1..3
    b = boundary_map(m)
    # inside pixels whose E/S/SE neighbour is outside, plus outside pixels whose E/S/SE neighbour is inside
    expected = np.zeros((6, 6), bool)
    expected[0, 0:4] = True  # above the square: their south or south-east is inside
    expected[1:4, 0] = True  # left of it
    expected[3, 1:4] = True  # its last row (south is outside)
    expected[1:3, 3] = True  # its last column (east is outside)
    assert b.tolist() == expected.tolist()


def _independent_f(pred, gt, bound_th=0.008):
    """F with boundaries found by looping over pixels and a Euclidean-distance dilation (no OpenCV, no shifts)."""
    h, w = pred.shape

    def bmap(m):
        out = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                nbrs = []
                if x + 1 < w:
                    nbrs.append(m[y, x + 1])
                if y + 1 < h:
                    nbrs.append(m[y + 1, x])
                if x + 1 < w and y + 1 < h:
                    nbrs.append(m[y + 1, x + 1])
                out[y, x] = any(v != m[y, x] for v in nbrs) if not (y == h - 1 and x == w - 1) else False
        return out

    r = math.ceil(bound_th * math.hypot(h, w))
    pb, gb = bmap(pred), bmap(gt)

    def near(points, other):
        oy, ox = np.nonzero(other)
        hits = 0
        for y, x in zip(*np.nonzero(points)):
            hits += bool(((oy - y) ** 2 + (ox - x) ** 2 <= r * r).any())
        return hits

    if pb.sum() == 0 and gb.sum() == 0:
        return 1.0
    if pb.sum() == 0 or gb.sum() == 0:
        return 0.0
    p, rec = near(pb, gb) / pb.sum(), near(gb, pb) / gb.sum()
    return 0.0 if p + rec == 0 else 2 * p * rec / (p + rec)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f_matches_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    h, w = 60, 90  # radius ceil(0.008 * 108.2) = 1
    gt = box(h, w, 10, 40, 20, 60)
    pred = box(h, w, 12 + seed, 43, 18, 58 + 2 * seed)
    pred[rng.random((h, w)) < 0.01] ^= True  # some speckle
    ours, theirs = boundary_f(pred, gt), _independent_f(pred, gt)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert 0 < ours < 1
    big = np.kron(pred, np.ones((3, 3), bool)), np.kron(gt, np.ones((3, 3), bool))  # radius 3 at 180x270
    assert boundary_f(*big) == pytest.approx(_independent_f(*big), abs=1e-12)


def test_f_edge_cases_and_tolerance():
    e = np.zeros((20, 20), bool)
    sq = box(20, 20, 5, 10, 5, 10)
    assert boundary_f(e, e) == 1.0
    assert boundary_f(e, sq) == 0.0 and boundary_f(sq, e) == 0.0
    assert boundary_f(sq, sq) == 1.0
    # a one-pixel shift lies within the radius (ceil(0.008 * 28.3) = 1): perfect F, imperfect J
    shifted = box(20, 20, 5, 10, 6, 11)
    assert boundary_f(shifted, sq) == 1.0 and region_j(shifted, sq) < 1
    far = box(20, 20, 5, 10, 12, 17)
    assert boundary_f(far, sq) == 0.0


def test_jf_averages_frames_then_expressions():
    a = box(8, 8, 0, 4, 0, 4)
    e = np.zeros((8, 8), bool)
    s1 = score_frames([(a, a), (e, a)])  # J: 1, 0; F: 1, 0
    assert (s1.j, s1.f, s1.num_frames) == (0.5, 0.5, 2)
    assert not s1.reappears  # present, then gone: it leaves but does not come back
    assert score_frames([(a, a), (e, e), (a, a)]).reappears  # present, gone, present
    assert not score_frames([(a, e), (a, a), (a, a), (a, e)]).reappears  # empty only before and after
    s2 = ExpressionScore("v/1", 1.0, 0.8, 5)
    m = summarize([s1, s2])
    assert m["J"] == pytest.approx(0.75) and m["F"] == pytest.approx(0.65)
    assert m["J&F"] == pytest.approx(0.7) and m["num_expressions"] == 2


# ------------------------------------------------------------------------------------------- layouts

def _frames(folder, names, h=12, w=16):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / f"{n}.jpg")


def _write_dataset(root, fmt, split="valid"):
    """Two videos, three expressions; expression 'v1/1' refers to objects 1 and 2 (union)."""
    names = ["00000", "00005"]
    base = root if fmt == "revos" else root / split
    masks = {("v1", 1): [box(12, 16, 1, 5, 1, 5), box(12, 16, 2, 6, 2, 6)],
             ("v1", 2): [box(12, 16, 7, 11, 9, 14), np.zeros((12, 16), bool)],
             ("v2", 1): [box(12, 16, 0, 12, 0, 3), box(12, 16, 0, 12, 1, 4)]}
    for v in ("v1", "v2"):
        _frames(base / "JPEGImages" / v, names)
    exps = {"v1": {"0": (["1"], "the square"), "1": (["1", "2"], "both shapes")}, "v2": {"0": (["1"], "the bar")}}
    palette_layout = fmt in ("refytvos", "refdavis")
    meta = {"videos": {}}
    mask_dict = {}
    for v, ex in exps.items():
        entry = {"frames": names, "expressions": {}}
        for eid, (objs, text) in ex.items():
            if palette_layout:
                entry["expressions"][eid] = {"exp": text, "obj_id": objs[0] if len(objs) == 1 else objs}
            else:
                ids = [f"{v}-{o}" for o in objs]
                entry["expressions"][eid] = {"exp": text, "anno_id": ids, "obj_id": [int(o) for o in objs]}
                for o, a in zip(objs, ids):
                    mask_dict[a] = [mask_to_rle(m) if m.any() else None for m in masks[(v, int(o))]]
        meta["videos"][v] = entry
    if palette_layout:
        for v in ("v1", "v2"):
            for t, n in enumerate(names):
                labels = np.zeros((12, 16), np.uint8)
                for (vv, o), ms in masks.items():
                    if vv == v:
                        labels[ms[t]] = o
                save_label_png_dir = base / "Annotations" / v
                save_label_png_dir.mkdir(parents=True, exist_ok=True)
                save_label_png(save_label_png_dir / f"{n}.png", labels)
        (root / "meta_expressions" / split).mkdir(parents=True, exist_ok=True)
        (root / "meta_expressions" / split / "meta_expressions.json").write_text(json.dumps(meta))
    else:
        (base / "mask_dict.json").write_text(json.dumps(mask_dict))
        meta_path = root / f"meta_expressions_{split}_.json" if fmt == "revos" else base / "meta_expressions.json"
        meta_path.write_text(json.dumps(meta))
    return masks


@pytest.mark.parametrize("fmt", ["refytvos", "mevis", "revos", "refdavis"])
def test_loaders_give_union_ground_truth(tmp_path, fmt):
    masks = _write_dataset(tmp_path, fmt)
    ds = load_video_dataset(tmp_path, fmt, "valid")
    assert [e.key for e in ds.expressions] == ["v1/0", "v1/1", "v2/0"] and ds.num_videos == 2
    both = list(ds.ground_truth(ds.expressions[1]))
    for t in range(2):
        assert np.array_equal(both[t], masks[("v1", 1)][t] | masks[("v1", 2)][t])
    assert [p.name for p in ds.frame_paths(ds.expressions[2])] == ["00000.jpg", "00005.jpg"]


def _write_predictions(root, masks, perturb=False):
    for (v, eid, objs) in (("v1", "0", [1]), ("v1", "1", [1, 2]), ("v2", "0", [1])):
        d = root / v / eid
        d.mkdir(parents=True)
        for t, n in enumerate(["00000", "00005"]):
            m = np.zeros((12, 16), bool)
            for o in objs:
                m |= masks[(v, o)][t]
            if perturb and v == "v2":
                m = np.zeros_like(m)  # v2 predicted empty: J = F = 0 on both frames
            save_label_png(d / f"{n}.png", m.astype(np.uint8))


def test_eval_video_cli_on_predictions_with_resume(tmp_path, capsys):
    from groundseg.cli import main

    masks = _write_dataset(tmp_path / "data", "mevis")
    _write_predictions(tmp_path / "pred", masks, perturb=True)
    argv = ["eval", "video", "--data-root", str(tmp_path / "data"), "--format", "mevis", "--split", "valid",
            "--predictions", str(tmp_path / "pred"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["J&F"] == pytest.approx(2 / 3) and report["J"] == pytest.approx(2 / 3)
    assert report["F"] == pytest.approx(2 / 3)
    assert (report["num_expressions"], report["num_videos"]) == (3, 2)
    assert "66.67" in out
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["sent_id"] for x in lines] == ["v1/0", "v1/1", "v2/0"]
    # a second run into the same folder must resume, and a resumed run gives the same report
    assert main(argv) == 2 and "pass --resume" in capsys.readouterr().err
    (tmp_path / "out" / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # torn line
    assert main(argv + ["--resume"]) == 0
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert again["J&F"] == pytest.approx(2 / 3) and again["resumed_expressions"] == 2


def test_eval_video_on_the_shapes_world_layout(tmp_path):
    """The shapes world's videos in the release layout score J&F = 1 against their own annotations."""
    from groundseg.datasets.shapes import write_shapes

    write_shapes(tmp_path / "w", seed=5, images=0, videos=3, image_size=64)
    vids = tmp_path / "w" / "videos"
    ds = load_video_dataset(vids, "refytvos", "train")
    assert (vids / "train" / "JPEGImages").is_dir() and (vids / "train" / "Annotations").is_dir()
    assert (vids / "meta_expressions" / "train" / "meta_expressions.json").is_file()
    pred = tmp_path / "pred"
    for e in ds.expressions:
        (pred / e.video / e.exp_id).mkdir(parents=True)
        for f, m in zip(e.frames, ds.ground_truth(e)):
            save_label_png(pred / e.video / e.exp_id / f"{f}.png", m.astype(np.uint8))
    res = evaluate_video(vids, "refytvos", "train", predictions=str(pred))
    assert res.metrics["J&F"] == 1.0 and res.metrics["num_expressions"] == len(ds.expressions) > 0


def test_eval_video_bad_input(tmp_path, capsys):
    from groundseg.cli import main

    _write_dataset(tmp_path / "data", "refytvos")
    base = ["eval", "video", "--data-root", str(tmp_path / "data"), "--split", "valid"]
    assert main(base + ["--format", "davis"]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(base + ["--format", "mevis"]) == 2  # no mask_dict.json / meta in the MeViS places
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    assert main(base + ["--format", "refytvos", "--predictions", str(tmp_path / "none")]) == 2
    assert "--predictions" in capsys.readouterr().err
    with pytest.raises(InputError, match="no ground truth"):
        (tmp_path / "data" / "valid" / "Annotations").rename(tmp_path / "data" / "valid" / "Ann")
        load_video_dataset(tmp_path / "data", "refytvos", "valid")


def test_eval_video_runs_a_model_and_writes_its_masks(tmp_path):
    """The model path: frames are streamed to ``model.track`` in the listed order, its masks are scored and
    written in the submission layout (here a stand-in model that answers with the ground truth of v1 shifted)."""
    masks = _write_dataset(tmp_path / "data", "refytvos")
    seen = []

    class Model:
        def track(self, source, prompts):
            from types import SimpleNamespace

            seen.append((source.name, prompts, [p.name for p in source.files]))
            for idx, rgb in source:
                ms = [masks[("v1", 1)][idx] if p == "the square" else np.zeros(rgb.shape[:2], bool) for p in prompts]
                yield SimpleNamespace(index=idx, masks=np.stack(ms))

    res = evaluate_video(tmp_path / "data", "refytvos", "valid", model=Model(), out=str(tmp_path / "out"),
                         model_name="stand-in")
    # one track() call per video: both expressions of v1 share its frames (read and encoded once)
    assert seen == [("v1", ["the square", "both shapes"], ["00000.jpg", "00005.jpg"]),
                    ("v2", ["the bar"], ["00000.jpg", "00005.jpg"])]
    by_key = {s.key: s for s in res.scores}
    assert [s.key for s in res.scores] == ["v1/0", "v1/1", "v2/0"]
    assert by_key["v1/0"].j == 1.0 and by_key["v1/0"].f == 1.0
    assert by_key["v1/1"].j == 0.0 and by_key["v2/0"].j == 0.0
    written = np.asarray(Image.open(tmp_path / "out" / "Annotations" / "v1" / "0" / "00005.png")) > 0
    assert np.array_equal(written, masks[("v1", 1)][1])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"] == "stand-in"


def test_revos_video_ids_with_slashes_count_as_videos(tmp_path):
    # ReVOS ids look like "UVO/all/-fbscFfkh4M": the video count must not stop at the first "/".
    from groundseg.cli import main

    data = tmp_path / "data"
    masks = _write_dataset(data, "revos")
    meta_path = data / "meta_expressions_valid_.json"
    meta = json.loads(meta_path.read_text())
    renamed = {"v1": "UVO/all/v1", "v2": "UVO/all/v2"}
    meta["videos"] = {renamed[v]: e for v, e in meta["videos"].items()}
    meta_path.write_text(json.dumps(meta))
    (data / "JPEGImages" / "UVO" / "all").mkdir(parents=True)
    for old, new in renamed.items():
        (data / "JPEGImages" / old).rename(data / "JPEGImages" / new)
    _write_predictions(tmp_path / "pred_flat", masks)
    (tmp_path / "pred" / "UVO" / "all").mkdir(parents=True)
    for old, new in renamed.items():
        (tmp_path / "pred_flat" / old).rename(tmp_path / "pred" / new)
    argv = ["eval", "video", "--data-root", str(data), "--format", "revos", "--split", "valid",
            "--predictions", str(tmp_path / "pred"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["num_expressions"], report["num_videos"]) == (3, 2)
    assert report["J&F"] == pytest.approx(1.0)


def test_eval_video_defaults_to_the_formats_validation_split(tmp_path):
    from groundseg.cli import main

    masks = _write_dataset(tmp_path / "data", "refytvos")  # split "valid", as the releases name it
    _write_predictions(tmp_path / "pred", masks)
    argv = ["eval", "video", "--data-root", str(tmp_path / "data"), "--format", "refytvos",
            "--predictions", str(tmp_path / "pred"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["split"] == "valid" and report["J&F"] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16", "RGB", "RGBA", "LA"])
def test_predictions_in_any_common_png_mode(tmp_path, mode):
    from groundseg.video import read_binary_png

    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    if mode == "1":
        img = Image.fromarray(m)
    elif mode in ("RGB", "RGBA", "LA"):
        chans = {"RGB": 3, "RGBA": 4, "LA": 2}[mode]
        a = np.zeros((5, 7, chans), np.uint8)
        a[..., 0] = m * 200
        a[..., -1] = 255 if mode != "RGB" else a[..., -1]  # opaque alpha everywhere: must not count as mask
        img = Image.fromarray(a, mode)
    else:
        img = Image.fromarray((m * 3).astype(np.uint16 if mode == "I;16" else np.uint8))
        if mode == "P":
            img = img.convert("P")
    img.save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as check:
        assert check.mode == mode
    assert np.array_equal(read_binary_png(tmp_path / "m.png"), m)


def test_shapes_videos_are_scored_per_expression_kind(tmp_path, capsys):
    # The shapes world's meta_expressions name each expression's kind; the report splits J&F by it. Predictions:
    # the exact masks for attribute expressions, nothing for motion ones, so attribute scores 1 and motion scores
    # the fraction of frames where its target is out of view (J and F are 1 there, 0 elsewhere).
    from groundseg.cli import main
    from groundseg.datasets.shapes import write_shapes

    write_shapes(tmp_path / "d", seed=4, images=1, videos=10, image_size=64)
    root = tmp_path / "d" / "videos"
    meta = json.loads((root / "meta_expressions" / "train" / "meta_expressions.json").read_text())["videos"]
    expected = {"attribute": [], "motion": []}
    reappearing = []  # J&F of expressions whose target leaves and comes back, computed from the annotations
    for vid, entry in meta.items():
        for exp_id, e in entry["expressions"].items():
            gt = [np.asarray(Image.open(root / "train" / "Annotations" / vid / f"{f}.png")) == int(e["obj_id"])
                  for f in entry["frames"]]
            out = tmp_path / "pred" / vid / exp_id
            out.mkdir(parents=True)
            for f, m in zip(entry["frames"], gt):
                keep = m if e["kind"] == "attribute" else np.zeros_like(m)
                Image.fromarray(keep.astype(np.uint8)).save(out / f"{f}.png")
            expected[e["kind"]].append(np.mean([not m.any() for m in gt]))
            seen = [k for k, m in enumerate(gt) if m.any()]
            if any(not gt[k].any() for k in range(seen[0], seen[-1] + 1)):
                reappearing.append(1.0 if e["kind"] == "attribute" else expected["motion"][-1])
    assert expected["motion"] and expected["attribute"]
    argv = ["eval", "video", "--data-root", str(root), "--format", "refytvos", "--split", "train",
            "--predictions", str(tmp_path / "pred"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    kinds = report["by_kind"]
    assert kinds["attribute"]["J&F"] == pytest.approx(1.0)
    assert kinds["attribute"]["num_expressions"] == len(expected["attribute"])
    assert kinds["motion"]["J&F"] == pytest.approx(np.mean(expected["motion"]))
    n = report["num_expressions"]
    assert report["J&F"] == pytest.approx((len(expected["attribute"]) + sum(expected["motion"])) / n)
    assert reappearing, "the shapes world's videos have objects that leave and re-enter"
    assert report["reappearing"]["num_expressions"] == len(reappearing)
    assert report["reappearing"]["J&F"] == pytest.approx(np.mean(reappearing))
    printed = capsys.readouterr().out
    assert "attribute" in printed and "motion" in printed and "reappears" in printed
