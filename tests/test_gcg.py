"""GCG: phrase <-> mask pairing, caption cleaning, and the GCG / region-caption metrics on hand-made cases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from groundseg.eval.gcg import (ap50, gcg_record, greedy_miou, grounded_answer, load_gcg_split, load_grandf,
                                load_regcap, mask_iou, recall_pairs, score_gcg, TextEncoder)
from groundseg.grounding.glamm import clean_caption, gcg_pairs
from groundseg.io import InputError, mask_to_rle


# ------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text,expected", [
    ("A <p> man </p> [SEG] rides a <p> horse </p> [SEG].", [("man", 0), ("horse", 1)]),
    # more [SEG] than phrases: the extra one has no phrase
    ("<p>a dog</p> [SEG] [SEG] near <p>a cat</p> [SEG]", [("a dog", 0), (None, 1), ("a cat", 2)]),
    # unterminated <p>: names nothing; the next complete phrase keeps its own [SEG]
    ("<p>a dog [SEG] and <p>a cat</p> [SEG]", [(None, 0), ("a cat", 1)]),
    # stray </p>, and a phrase with a [SEG] inside its tags
    ("x </p> [SEG] <p> c [SEG] </p> [SEG]", [(None, 0), (None, 1), (None, 2)]),
    # two phrases before one [SEG]: the nearer one
    ("<p>a</p> <p>b</p> [SEG]", [("b", 0)]),
    ("no grounding at all", []),
])
def test_gcg_pairs(text, expected):
    assert gcg_pairs(text) == expected


def test_clean_caption_as_official():
    # newline deleted (joining words), tags and [SEG] removed, spaces collapsed, quotes stripped: " ." stays
    assert clean_caption("'A <p> man </p> [SEG] rides\na <p>horse</p> [SEG].'") == "A man ridesa horse ."
    rec = gcg_record("im", "A <p> man </p> [SEG] and <p>dog</p>", np.zeros((1, 2, 3), bool))
    assert rec["phrases"] == ["man", "dog"] and rec["caption"] == "A man and dog" and len(rec["pred_masks"]) == 1


# ------------------------------------------------------------------------------------------ metrics

def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_greedy_miou_hand_case():
    a, b = box(10, 10, 0, 10, 0, 5), box(10, 10, 0, 10, 5, 10)  # halves
    pa = box(10, 10, 0, 10, 0, 4)  # IoU with a: 40/50 = 0.8
    pb = box(10, 10, 0, 5, 5, 10)  # IoU with b: 25/50 = 0.5
    assert mask_iou(pa, a) == pytest.approx(0.8)
    assert greedy_miou([pb, pa], [a, b]) == pytest.approx((0.8 + 0.5) / 2)
    # an extra prediction that overlaps nothing is not penalised; no overlap at all gives 0
    assert greedy_miou([pa, pb, box(10, 10, 0, 0, 0, 0)], [a, b]) == pytest.approx(0.65)
    assert greedy_miou([box(10, 10, 0, 1, 0, 1)], [b]) == 0.0
    # one-to-one: a second prediction cannot reuse a taken GT
    assert greedy_miou([a, a], [a]) == pytest.approx(1.0)


def exact(x: str, y: str) -> float:
    return 1.0 if x == y else 0.0


def test_recall_pairs_hand_cases():
    a, b, c = box(8, 8, 0, 4, 0, 4), box(8, 8, 4, 8, 4, 8), box(8, 8, 0, 4, 4, 8)
    assert recall_pairs([a, b], ["dog", "cat"], [b, a], ["cat", "dog"], exact) == 2
    # the best-IoU pair has the wrong phrase: the search stops there, even though (b, cat) would match
    assert recall_pairs([a, b], ["dog", "cat"], [a, b], ["bird", "cat"], exact) == 0
    # IoU below 0.5 stops it too
    half = box(8, 8, 0, 4, 0, 1)
    assert recall_pairs([a], ["dog"], [half], ["dog"], exact) == 0
    # more masks than phrases: the search reaches phrase index 1, which does not exist -> the image scores 0
    assert recall_pairs([a, c], ["dog", "cat"], [c, a], ["cat"], exact) == 0
    # no predictions
    assert recall_pairs([a], ["dog"], [], [], exact) == 0


def test_ap50_hand_cases():
    h = w = 20
    g1, g2 = box(h, w, 0, 10, 0, 10), box(h, w, 10, 20, 10, 20)
    gt = {"images": [{"id": "img1", "height": h, "width": w}],
          "annotations": [{"id": 1, "image_id": "img1", "category_id": 1, "segmentation": mask_to_rle(g1)},
                          {"id": 2, "image_id": "img1", "category_id": 1, "segmentation": mask_to_rle(g2)}]}
    assert ap50(gt, ["img1"], {"img1": [mask_to_rle(g1), mask_to_rle(g2)]}) == pytest.approx(1.0)
    # one of two found (the other prediction misses): recall tops out at 0.5 -> 101-point AP ~ 0.5
    miss = box(h, w, 0, 5, 15, 20)
    assert ap50(gt, ["img1"], {"img1": [mask_to_rle(g1), mask_to_rle(miss)]}) == pytest.approx(0.5, abs=0.02)
    assert ap50(gt, ["img1"], {"img1": []}) == 0.0


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with a WordPiece vocabulary (as a stand-in for bert-base-uncased)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "dog", "cat", "red", "ball", "man"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    import torch

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(d))
    return d


def test_text_encoder_mean_pooled_cosine(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    enc = TextEncoder(tiny_bert)
    assert enc.similarity("the dog", "the dog") == pytest.approx(1.0, abs=1e-6)
    tok, model = AutoTokenizer.from_pretrained(str(tiny_bert)), AutoModel.from_pretrained(str(tiny_bert)).eval()
    with torch.no_grad():
        e = [model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0) for t in ("a dog", "red ball")]
    expected = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item()
    assert enc.similarity("a dog", "red ball") == pytest.approx(expected, abs=1e-5)
    with pytest.raises(InputError, match="not a folder"):
        TextEncoder(tiny_bert / "nope")


def write_gcg_split(root, split, images):
    """images: [(id, file, (h, w), caption, [(phrase, mask)])] -> the two GranD-f evaluation files."""
    masks = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    caps = {"images": [], "annotations": []}
    for k, (iid, fname, (h, w), caption, pairs) in enumerate(images):
        masks["images"].append({"id": iid, "file_name": fname, "height": h, "width": w})
        caps["images"].append({"id": iid, "file_name": fname, "height": h, "width": w})
        caps["annotations"].append({"id": k + 1, "image_id": iid, "caption": caption,
                                    "labels": [p for p, _ in pairs]})
        for p, m in pairs:
            masks["annotations"].append({"id": len(masks["annotations"]) + 1, "image_id": iid, "category_id": 1,
                                         "segmentation": mask_to_rle(m), "iscrowd": 0})
    (root / f"{split}_gcg_coco_mask_gt.json").write_text(json.dumps(masks))
    (root / f"{split}_gcg_coco_caption_gt.json").write_text(json.dumps(caps))


def test_score_gcg_end_to_end(tmp_path, tiny_bert, monkeypatch):
    a, b = box(10, 10, 0, 10, 0, 5), box(10, 10, 0, 10, 5, 10)
    write_gcg_split(tmp_path, "val", [("i1", "i1.png", (10, 10), "A dog and a cat.", [("a dog", a), ("a cat", b)]),
                                      ("i2", "i2.png", (10, 10), "A red ball.", [("a red ball", a)])])
    images, gt = load_gcg_split(tmp_path, "val")
    assert [g.image_id for g in images] == ["i1", "i2"] and images[0].phrases == ["a dog", "a cat"]
    preds = {"i1": gcg_record("i1", "<p> a dog </p> [SEG] and <p> a cat </p> [SEG].", np.stack([a, b])),
             "i2": gcg_record("i2", "<p> a man </p> [SEG].", np.stack([b]))}
    import groundseg.eval.gcg as gcg_mod

    seen = {}

    def fake_caption_metrics(refs, cands):  # the Java scorer is tested on its own below
        seen.update(refs=refs, cands=cands)
        return {"METEOR": 0.25, "CIDEr": 1.5}

    monkeypatch.setattr(gcg_mod, "caption_metrics", fake_caption_metrics)
    rep = score_gcg(images, gt, preds, TextEncoder(tiny_bert))
    assert seen["refs"] == {"i1": ["A dog and a cat."], "i2": ["A red ball."]}
    assert seen["cands"] == {"i1": "a dog and a cat .", "i2": "a man ."}
    assert (rep["METEOR"], rep["CIDEr"]) == (0.25, 1.5)
    assert rep["mIoU"] == pytest.approx((1.0 + 0.0) / 2)
    assert rep["recall"] == pytest.approx(2 / 3)  # i1 both, i2 none (IoU 0)
    assert rep["recall_text_encoder"] == str(tiny_bert)
    assert rep["AP50"] == pytest.approx(2 / 3, abs=0.02)  # 2 of 3 GT found, no false positive ranks first
    no_enc = score_gcg(images, gt, preds, None)
    assert no_enc["recall"] is None and no_enc["recall_text_encoder"] is None


def test_caption_metrics_hand_case():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    from groundseg.eval.captions import caption_metrics

    # CIDEr-D: an exact candidate scores 10 (cosine 1 x length penalty 1 x 10), a disjoint one 0; corpus = mean
    got = caption_metrics({1: ["a man rides a horse"], 2: ["two dogs play in the park"]},
                          {1: "A man rides a horse.", 2: "a cat sleeps"})
    assert got["CIDEr"] == pytest.approx(5.0)
    assert 0.3 < got["METEOR"] < 0.7  # corpus METEOR: one exact match, one miss


def test_gcg_split_errors(tmp_path):
    with pytest.raises(InputError, match="val_gcg_coco_mask_gt.json: GCG mask ground truth not found"):
        load_gcg_split(tmp_path, "val")
    write_gcg_split(tmp_path, "val", [("i1", "i1.png", (4, 4), "x", [])])
    cap = json.loads((tmp_path / "val_gcg_coco_caption_gt.json").read_text())
    cap["annotations"][0]["image_id"] = "zz"
    (tmp_path / "val_gcg_coco_caption_gt.json").write_text(json.dumps(cap))
    with pytest.raises(InputError, match="annotations\\[0\\] refers to unknown image id 'zz'"):
        load_gcg_split(tmp_path, "val")


# ------------------------------------------------------------------------------------------ GranD-f files

def test_grandf_formats_load(tmp_path):
    rle = mask_to_rle(box(6, 6, 0, 3, 0, 3))
    ha = [{"file_name": "sa_1.jpg", "caption": "A man rides a horse.",
           "groundings": {"a horse": {"token_positives": [12, 19], "rle_masks": [rle]},
                          "A man": {"token_positives": [0, 5], "rle_masks": [rle, rle]}}}]
    (tmp_path / "ha.json").write_text(json.dumps(ha))
    s = load_grandf(tmp_path / "ha.json", "GranDf_HA")[0]
    assert s.phrases == ["A man", "a horse"] and s.spans == [(0, 5), (12, 19)] and len(s.segmentations[0]) == 2
    assert grounded_answer(s) == "<p> A man </p> [SEG] rides <p> a horse </p> [SEG]."
    assert load_grandf(tmp_path / "ha.json", "OpenPSG")[0].phrases == s.phrases

    poly = [[0, 0, 4, 0, 4, 4, 0, 4]]
    refc = [{"17": {"img_file_name": "COCO_1.jpg", "caption": "The red ball is next to the big dog.",
                    "refs": [{"sentence": "the big dog", "segmentation": poly},
                             {"sentence": "the red ball", "segmentation": poly}]}}]
    (tmp_path / "refc.json").write_text(json.dumps(refc))
    r = load_grandf(tmp_path / "refc.json", "RefCOCOg_GCG")[0]
    assert r.phrases == ["The red ball", "the big dog"] and r.spans[0] == (0, 12)

    flickr = {"images": [{"id": 5, "file_name": "f.jpg", "caption": "A dog runs on grass.", "height": 6, "width": 6},
                         {"id": 6, "file_name": "g.jpg", "caption": "Too short", "height": 6, "width": 6}],
              "annotations": [{"image_id": 5, "bbox": [0, 0, 3, 3], "tokens_positive": [[0, 5]], "sam_mask": rle}]}
    (tmp_path / "flickr.json").write_text(json.dumps(flickr))
    f = load_grandf(tmp_path / "flickr.json", "Flickr")
    assert len(f) == 1 and f[0].phrases == ["A dog"]
    with pytest.raises(InputError, match="GranD-f format 'PSG'"):
        load_grandf(tmp_path / "ha.json", "PSG")
    with pytest.raises(InputError, match="entry 0 has no 'groundings'"):
        (tmp_path / "bad.json").write_text(json.dumps([{"file_name": "x", "caption": "y"}]))
        load_grandf(tmp_path / "bad.json", "GranDf_HA")


def test_regcap_file_errors(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "caption": "a red ball"}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    s = load_regcap(tmp_path / "r.json")[0]
    assert s.box_xyxy == (1, 2, 4, 6) and s.captions == ["a red ball"]
    data["annotations"][0]["bbox"] = [1, 2, 0, 4]
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"annotations\[0\]\['bbox'\] = \[1, 2, 0, 4\]: expected \[x, y, w, h\]"):
        load_regcap(tmp_path / "r.json")


def test_caption_metrics_unavailable_is_reported_not_raised(monkeypatch):
    """Without Java (or pycocoevalcap) the GCG report says why METEOR/CIDEr are missing instead of failing."""
    pytest.importorskip("pycocoevalcap")
    import groundseg.eval.captions as captions
    from groundseg.eval.gcg import _caption_report

    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    rep = _caption_report({1: ["a dog"]}, {1: "a dog"})
    assert rep["METEOR"] is None and rep["CIDEr"] is None
    assert "need Java on the PATH" in rep["caption_metrics_error"]


def test_word_overlap_similarity_hand_values():
    from groundseg.eval.gcg import WordOverlap, text_encoder_for

    sim = WordOverlap.similarity
    assert sim("a red circle", "A red circle") == pytest.approx(1.0)
    assert sim("a red circle", "a red square") == pytest.approx(2 / 3)
    assert sim("a red circle", "a blue square") == pytest.approx(1 / 3)
    # counts, not sets: (1*2) / (sqrt(1) * sqrt(4))
    assert sim("red", "red red") == pytest.approx(1.0)
    assert sim("red blue", "red red") == pytest.approx(2 / (np.sqrt(2) * 2))
    assert sim("", "a red circle") == 0.0
    assert text_encoder_for(None) is None
    assert "words" in text_encoder_for("words").path


def test_regcap_exact_match_ignores_case_and_punctuation():
    from groundseg.eval.gcg import exact_match

    gts = {1: ["a large purple star"], 2: ["a small red circle", "the red circle"], 3: ["a blue square"]}
    preds = {1: "A large purple star.", 2: "the red  circle", 3: "a blue star"}
    assert exact_match(gts, preds) == pytest.approx(2 / 3)


def test_regcap_attribute_accuracy_by_hand():
    from groundseg.eval.gcg import attribute_accuracy

    gts = {1: ["a large red circle"], 2: ["a small blue star"], 3: ["a green hexagon"], 4: ["a dog"]}
    preds = {1: "A large red circle.",  # all right
             2: "a small blue stars and a red star",  # shape right (plural), colour wrong: two colours named
             3: "a large green diamond",  # colour right, shape wrong; its reference names no size
             4: "a red circle"}  # the reference names nothing of the shapes world: counts nowhere
    acc = attribute_accuracy(gts, preds)
    assert acc["colour"] == pytest.approx(2 / 3) and acc["shape"] == pytest.approx(2 / 3)
    assert acc["size"] == pytest.approx(2 / 2) and acc["colour_and_shape"] == pytest.approx(1 / 3)
    assert attribute_accuracy({1: ["a dog"]}, {1: "a dog"}) is None
    assert "colour_and_shape_of_any_region" not in acc


def test_regcap_captions_that_describe_another_region_of_the_image_are_counted():
    from groundseg.eval.gcg import attribute_accuracy

    # Image a holds a red circle and a blue star; image b a green square and a blue star.
    gts = {1: ["a large red circle"], 2: ["a small blue star"], 3: ["a green square"], 4: ["a blue star"],
           5: ["a dog"]}
    image_of = {1: "a.png", 2: "a.png", 3: "b.png", 4: "b.png", 5: "b.png"}
    preds = {1: "a blue star",       # wrong for its box, but the other region of its image
             2: "a small blue star",  # right
             3: "a red circle",       # in image a, not in b: counts nowhere
             4: "a green square",     # the other region of image b
             5: "a red circle"}       # its reference names no colour or shape: not counted
    acc = attribute_accuracy(gts, preds, image_of)
    assert acc["colour_and_shape"] == pytest.approx(1 / 4)
    assert acc["colour_and_shape_of_any_region"] == pytest.approx(3 / 4)
