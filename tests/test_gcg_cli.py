"""CLI round trips for GLaMM on the tiny preset and the real photos: `segment --box`, `segment --gcg`,
`eval gcg` (with --resume) and `eval regcap`, and their one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import groundseg.eval.gcg as gcg_mod
import groundseg.hub
from groundseg.cli import main
from groundseg.io import PALETTE, mask_to_bbox, rle_to_mask

from test_gcg import tiny_bert  # noqa: F401  (fixture)
from test_segment import script

GCG_ANSWER = "<p> A dog </p> [SEG] on <p> the grass </p> [SEG] [SEG]."


def use_glamm(monkeypatch, answer: str | None = None) -> list:
    """The CLI loads glamm-tiny (scripted to answer ``answer`` when given); returns the models it made."""
    real, made = groundseg.hub.load_model, []

    def load(name=None, **kw):
        m = real("glamm-tiny")
        if answer is not None:
            script(m, answer)
        made.append(m)
        return m

    monkeypatch.setattr(groundseg.hub, "load_model", load)
    return made


def test_segment_gcg_pairs_phrases_masks_and_legend(monkeypatch, media, tmp_path, capsys):
    made = use_glamm(monkeypatch, GCG_ANSWER)
    out = tmp_path / "out"
    assert main(["segment", str(media / "dog.jpg"), "--model", "glamm-tiny", "--gcg", "--out", str(out)]) == 0
    assert GCG_ANSWER in capsys.readouterr().out
    data = json.loads((out / "dog.json").read_text())
    assert data["caption"] == "A dog on the grass ."
    # three [SEG], two phrases: the third mask has no phrase
    assert [m["phrase"] for m in data["masks"]] == ["A dog", "the grass", None]
    for m in data["masks"]:
        mask = rle_to_mask(m["segmentation"])
        assert mask.shape == (534, 800) and m["bbox"] == mask_to_bbox(mask)
    # the prompt was GLaMM's standard GCG question
    assert made[0].config.gcg_prompt.startswith("Could you please give me a detailed description")
    over = np.asarray(Image.open(out / "dog_overlay.jpg"))
    assert over.shape[1] == 800 and over.shape[0] > 534  # legend strip below the image
    legend = over[534:].reshape(-1, 3).astype(int)
    for k in range(3):  # each colour's swatch is in the legend
        assert (np.abs(legend - PALETTE[k]).sum(1) < 30).sum() > 50, k


def test_segment_box_prompt_round_trip(monkeypatch, media, tmp_path, capsys):
    made = use_glamm(monkeypatch)
    out = tmp_path / "out"
    args = ["segment", str(media / "truck.jpg"), "--model", "glamm-tiny", "--box", "10,20,300,200",
            "--box", "400,100,900,700", "--prompt", "What is in region1 <bbox> and region2 <bbox>?",
            "--max-new-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    text = json.loads((out / "truck.json").read_text())["text"]
    # the same answer through the Python API, and the boxes matter: other boxes, other region vectors
    m = made[0]
    again = m.segment(str(media / "truck.jpg"), "What is in region1 <bbox> and region2 <bbox>?",
                      boxes=[(10, 20, 300, 200), (400, 100, 900, 700)], max_new_tokens=4)[0]
    assert again.text == text
    prep = m.prepare_image(str(media / "truck.jpg"))
    _, levels = m._encode_clip(prep.clip[None])
    h, w = prep.original_size
    feats = [m.encode_regions(levels, [torch.tensor([b]) / torch.tensor([w, h, w, h])]).features[0]
             for b in ((10, 20, 300, 200), (400, 100, 900, 700))]
    assert not np.allclose(feats[0].detach().numpy(), feats[1].detach().numpy())


@pytest.mark.parametrize("args,message", [
    (["--model", "lisa-tiny", "--box", "1,2,30,40", "--prompt", "What is in <bbox>?"],
     "--box: the lisa family has no region encoder"),
    (["--model", "glamm-tiny", "--box", "1,2,30,40", "--prompt", "What is this?"],
     "--prompt has 0 <bbox> placeholder(s) but 1 --box given"),
    (["--model", "glamm-tiny", "--prompt", "What is in <bbox>?"], "--prompt has 1 <bbox> placeholder(s) but 0"),
    (["--model", "lisa-tiny", "--gcg"], "--gcg: the lisa family has no grounded conversation generation"),
    (["--model", "glamm-tiny", "--gcg", "--prompt", "x"], "--gcg uses the model's standard"),
    (["--model", "glamm-tiny"], "--prompt is required (or --gcg"),
    (["--model", "glamm-tiny", "--box", "1,2,3", "--prompt", "<bbox>"], "expected four numbers x1,y1,x2,y2"),
])
def test_segment_region_and_gcg_errors(media, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["segment", str(media / "dog.jpg"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("groundseg: error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def shapes_gcg(shapes_folder):
    return shapes_folder(seed=3, images=20)


def test_shapes_writes_grandf_files(shapes_gcg):
    from groundseg.eval.gcg import load_gcg_split, load_regcap

    images, _ = load_gcg_split(shapes_gcg / "gcg", "test")
    grounded = json.loads((shapes_gcg / "shapes" / "grounded(unc).json").read_text())["images"]
    inst = {a["id"]: a for a in json.loads((shapes_gcg / "shapes" / "instances.json").read_text())["annotations"]}
    by_id = {g["image_id"]: g for g in grounded}
    assert [g.image_id for g in images] == [g["image_id"] for g in grounded if g["split"] == "test"]
    for g in images:
        src = by_id[g.image_id]
        assert "<p>" not in g.captions[0] and len(g.phrases) == src["caption"].count("[SEG]")
        # phrase k and mask k are the same object: the k-th [SEG]'s annotation
        for seg, ann_id in zip(g.segmentations, src["caption_ann_ids"]):
            assert seg == inst[ann_id]["segmentation"]
        assert all(p in src["caption"] for p in g.phrases)
    regs = load_regcap(shapes_gcg / "gcg" / "test_regcap_coco_caption_gt.json")
    assert len(regs) == sum(len(by_id[g.image_id]["region_questions"]) for g in images)


def test_eval_gcg_run_resume_and_perfect_predictions(monkeypatch, shapes_gcg, tiny_bert, tmp_path, capsys):  # noqa: F811
    use_glamm(monkeypatch)
    monkeypatch.setattr(gcg_mod, "caption_metrics", lambda refs, cands: {"METEOR": 0.5, "CIDEr": 2.0})
    out = tmp_path / "run"
    base = ["eval", "gcg", "--data-root", str(shapes_gcg / "gcg"), "--split", "test", "--model", "glamm-tiny",
            "--max-new-tokens", "3", "--text-encoder", str(tiny_bert), "--out", str(out)]
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and f"mask recall text encoder: {tiny_bert}" in printed
    report = json.loads((out / "report.json").read_text())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert report["num_images"] == len(lines) >= 1 and report["recall_text_encoder"] == str(tiny_bert)
    # Replace the logged predictions by the ground truth itself: --resume scores them without predicting again.
    gt_masks = json.loads((shapes_gcg / "gcg" / "test_gcg_coco_mask_gt.json").read_text())["annotations"]
    gt_caps = {a["image_id"]: a for a in
               json.loads((shapes_gcg / "gcg" / "test_gcg_coco_caption_gt.json").read_text())["annotations"]}
    perfect = []
    for line in lines:
        rec = json.loads(line)
        iid = rec["image_id"]
        rec["pred_masks"] = [a["segmentation"] for a in gt_masks if a["image_id"] == iid]
        rec["phrases"], rec["caption"] = gt_caps[iid]["labels"], gt_caps[iid]["caption"]
        perfect.append(json.dumps(rec))
    (out / "predictions.jsonl").write_text("\n".join(perfect) + "\n")
    assert main(base + ["--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mIoU"] == pytest.approx(1.0) and report["recall"] == pytest.approx(1.0)
    assert report["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert (report["METEOR"], report["CIDEr"]) == (0.5, 2.0)
    # a different run in the same folder is refused
    assert main([*base[:-2], "--limit", "1", "--out", str(out), "--resume"]) == 2
    assert "holds a different run" in capsys.readouterr().err


def test_eval_regcap_run(monkeypatch, shapes_gcg, tmp_path, capsys):
    use_glamm(monkeypatch)
    seen = {}

    def fake(refs, cands):
        seen.update(refs=refs, cands=cands)
        return {"METEOR": 0.1, "CIDEr": 0.2}

    monkeypatch.setattr(gcg_mod, "caption_metrics", fake)
    out = tmp_path / "reg"
    assert main(["eval", "regcap", "--data-root", str(shapes_gcg / "gcg"), "--split", "test", "--model",
                 "glamm-tiny", "--max-new-tokens", "2", "--limit", "3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_regions"] == 3 and report["METEOR"] == 0.1
    assert len(seen["refs"]) == 3 and all(isinstance(v, list) for v in seen["refs"].values())


@pytest.mark.parametrize("task,extra,message", [
    ("gcg", [], "test_gcg_coco_mask_gt.json not found"),
    ("regcap", [], "test_regcap_coco_caption_gt.json not found"),
    ("regcap", ["--text-encoder", "x"], "--text-encoder is for eval gcg"),
])
def test_eval_gcg_errors(tmp_path, capsys, task, extra, message):
    assert main(["eval", task, "--data-root", str(tmp_path), "--split", "test", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_gcg_with_a_box_is_one_clear_line(tmp_path, capsys):
    from groundseg import cli

    img = tmp_path / "a.png"
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(img)
    assert cli.main(["segment", str(img), "--model", "glamm-tiny", "--gcg", "--box", "1,1,10,10"]) == 2
    err = capsys.readouterr().err
    assert "--gcg captions the whole image and takes no --box" in err and err.count("\n") == 1
