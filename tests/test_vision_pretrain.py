"""The vision pretraining stage (train/vision_pretrain.py): its labels, its pooled loss against a hand computation,
that it trains the tower only and leaves no trace in the model, and its place in a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from groundseg.train import trainer
from groundseg.train.vision_pretrain import (CLASSES, attribute_losses, make_images, object_logits, pretrain_vision,
                                             shapes_patch_labels, vision_tower)


def test_patch_labels_are_the_objects_under_the_patch_centres():
    from groundseg.datasets.shapes import COLORS, SHAPES, SIZES, ShapesWorld

    item = ShapesWorld(seed=3, image_size=64).image(0)
    lab = shapes_patch_labels(item, 4)  # 16-px patches of a 64-px square image: centres at 8, 24, 40, 56
    assert lab.shape == (4, 4, 4) and lab.dtype == np.int64
    by_id = {o.id: o for o in item.objects}
    for r, y in enumerate((8, 24, 40, 56)):
        for c, x in enumerate((8, 24, 40, 56)):
            top = [o for o in item.objects if o.mask[y, x]]
            oid = max((o.id for o in top), default=0)  # masks are the visible pixels, so at most one holds
            assert len(top) <= 1 and lab[3, r, c] == oid
            if oid:
                o = by_id[oid]
                assert lab[:3, r, c].tolist() == [list(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1,
                                                  list(SIZES).index(o.size) + 1]
            else:
                assert lab[:3, r, c].tolist() == [0, 0, 0]


def test_object_logits_average_each_objects_patches():
    # 1 image, 4 patches: object 2 on patches 0 and 2, object 5 on patch 3, background on patch 1
    c = sum(CLASSES)
    logits = torch.arange(4 * c, dtype=torch.float32).reshape(1, 4, c)
    # rows: colour, shape, size, object id of each patch
    labels = torch.tensor([[[1, 0, 1, 2], [1, 0, 1, 2], [1, 0, 1, 2], [2, 0, 2, 5]]])
    pooled, targets = object_logits(logits, labels)
    assert pooled.shape == (2, c)
    assert torch.equal(pooled[0], (logits[0, 0] + logits[0, 2]) / 2) and torch.equal(pooled[1], logits[0, 3])
    assert targets.tolist() == [[1, 1, 1], [2, 2, 2]]


def test_losses_against_hand_values():
    # uniform logits: every CE is log(classes); the patch loss sums the three heads, the object loss too
    labels = torch.tensor([[[1, 0, 3], [2, 0, 4], [1, 0, 2], [7, 0, 9]]])  # (1, 4, 3): colour/shape/size/id rows
    logits = torch.zeros(1, 3, sum(CLASSES))
    patch, obj = attribute_losses(logits, labels)
    expected = sum(math.log(k) for k in CLASSES)
    assert float(patch) == pytest.approx(expected, rel=1e-6) and float(obj) == pytest.approx(expected, rel=1e-6)
    # no object at all: the object loss is 0, not NaN
    _, none = attribute_losses(logits, torch.zeros(1, 4, 3, dtype=torch.long))
    assert float(none) == 0.0


def _pretrain_changes_only(model, prefix: str, **kw):
    """Run the stage; check that it changed the tensors under ``prefix`` and nothing else, and left no head."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pretrain_vision(model, **kw)
    after = model.state_dict()
    assert set(after) == set(before)  # the head is gone
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(prefix) for k in changed), sorted(changed)[:5]
    return result


def test_stage_trains_the_tower_alone_and_learns_colour():
    from groundseg import load_model

    model = load_model("lisa-tiny")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    torch.manual_seed(0)
    result = _pretrain_changes_only(model, "vlm.vision_tower.", steps=60, batch_size=16, lr=3e-3, images=200,
                                    seed=5, image_size=64, held_out=40, log=None)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    # colour is a per-pixel property: 60 steps take it far above the 1/6 of a guess on held-out images
    assert result.object_accuracy["colour"] > 0.6, result
    assert set(result.patch_accuracy) == {"colour", "shape", "size"}


def test_a_run_pretrains_first_and_records_it(tmp_path, monkeypatch):
    from groundseg.train.data import build_source

    real = build_source
    monkeypatch.setattr(trainer, "build_source", lambda *a, **kw: real(*a, **{**kw, "image_size": 64}))
    cfg = trainer.TrainConfig(out=str(tmp_path / "run"), model="lisa-tiny", dataset="shapes",
                              shapes_tasks={"refer": 1}, shapes_image_size=64, steps=2, batch_size=2,
                              warmup_steps=1, save_every=2, log_every=1, progress=False, lora=False, train_all=True,
                              vision_pretrain_steps=5, vision_pretrain_batch=4, vision_pretrain_images=20)
    out = trainer.train(cfg)
    rec = json.loads((out / "vision_pretrain.json").read_text())
    assert rec["steps"] == 5 and set(rec["object_accuracy"]) == {"colour", "shape", "size"}
    with pytest.raises(trainer.InputError, match="shapes world"):
        trainer.train(trainer.TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "r2"),
                                             "dataset": "refer_seg", "data_root": str(tmp_path)}))


def test_a_frozen_tower_is_pretrained_by_the_stage_then_kept_by_the_main_loop(tmp_path, monkeypatch):
    # --frozen on SAM2's image encoder (the README's CPU Sa2VA runs) still lets the vision stage train it (the stage
    # asks for its gradients itself), and the main loop then leaves it exactly as the stage left it while the
    # decoder trains.
    from groundseg.hub import load_model
    from groundseg.train.data import build_source

    enc = "grounding_encoder.sam2_model.image_encoder."
    seen = {}
    real_stage, real_source = trainer._vision_stage, build_source

    def stage(cfg, model, accelerator, out):
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(enc)}
        real_stage(cfg, model, accelerator, out)
        seen["after"] = {k: v.clone() for k, v in model.state_dict().items()
                         if k.startswith(enc) or ".sam_mask_decoder." in k}
        seen["flags"] = {n: p.requires_grad for n, p in model.named_parameters()}

    monkeypatch.setattr(trainer, "_vision_stage", stage)
    monkeypatch.setattr(trainer, "build_source", lambda *a, **kw: real_source(*a, **{**kw, "image_size": 64}))
    cfg = trainer.TrainConfig(out=str(tmp_path / "run"), model="sa2va-tiny", from_scratch=True, dataset="shapes",
                              shapes_tasks={"refer": 1}, shapes_image_size=64, steps=2, batch_size=2, lr=1e-2,
                              warmup_steps=1, save_every=2, log_every=1, progress=False, lora=False,
                              train_all=True, frozen=[enc.rstrip(".")], attribute_weight=0.0,
                              vision_pretrain_steps=3, vision_pretrain_batch=2, vision_pretrain_images=6)
    out = trainer.train(cfg)
    assert any(not torch.equal(seen["after"][k], v) for k, v in seen["before"].items())  # the stage trained it
    assert not any(f for n, f in seen["flags"].items() if n.startswith(enc))  # and handed it back frozen
    final = load_model(out / "final").state_dict()
    for k in seen["before"]:
        assert torch.equal(final[k], seen["after"][k]), k
    decoder = [k for k in seen["after"] if ".sam_mask_decoder." in k and k in final]
    assert decoder and any(not torch.equal(final[k], seen["after"][k]) for k in decoder)


def test_sa2va_stage_trains_sam2s_image_encoder_on_whole_frame_labels():
    # For Sa2VA the stage trains SAM2's image encoder: labels on SAM2's low-resolution mask grid of the whole image
    # (SAM2 resizes the frame, it does not crop), features upsampled 4x to that grid.
    from groundseg import load_model
    from groundseg.datasets.shapes import ShapesWorld
    from groundseg.train.data import attribute_labels, frame_grid_labels
    from groundseg.train.vision_pretrain import vision_tower

    torch.manual_seed(0)
    model = load_model("sa2va-tiny")
    tower = vision_tower(model)
    assert tower.module is model.grounding_encoder.sam2_model.image_encoder and not tower.crop
    assert tower.grid == model.grounding_encoder.image_size // 4
    item = ShapesWorld(seed=5, image_size=48).image(0)
    labels = shapes_patch_labels(item, tower.grid, crop=False)
    amap, _ = attribute_labels(item, [])
    assert np.array_equal(labels[:3], frame_grid_labels(amap, tower.grid))
    feats = tower.features(tower.preprocess(item.image)[None])
    assert feats.shape == (1, tower.grid ** 2, tower.width)
    result = _pretrain_changes_only(model, "grounding_encoder.sam2_model.image_encoder.", steps=30, batch_size=8,
                                    lr=3e-3, images=60, seed=5, image_size=64, held_out=20, log=None)
    assert set(result.object_accuracy) == {"colour", "shape", "size"}
    assert result.object_accuracy["colour"] > 0.3, result  # a guess is 1/6


def test_position_loss_against_hand_values():
    from groundseg.train.vision_pretrain import position_loss

    g = 3
    # uniform logits: log(g) for the row plus log(g) for the column
    assert float(position_loss(torch.zeros(2, g * g, 2 * g), g)) == pytest.approx(2 * math.log(g), rel=1e-6)
    # patch i = (row i // g, column i % g), row-major; logits that say so with a margin of 20 cost ~0
    right = torch.zeros(1, g * g, 2 * g)
    for i in range(g * g):
        right[0, i, i // g] = right[0, i, g + i % g] = 20.0
    assert float(position_loss(right, g)) < 1e-6
    # transposed (row and column swapped): wrong on every off-diagonal patch
    wrong = torch.zeros(1, g * g, 2 * g)
    for i in range(g * g):
        wrong[0, i, i % g] = wrong[0, i, g + i // g] = 20.0
    off = (g * g - g) / (g * g)  # share of patches whose row != column
    assert float(position_loss(wrong, g)) == pytest.approx(2 * off * 20.0, rel=1e-3)


def test_stage_with_a_position_weight_teaches_and_reports_patch_positions():
    from groundseg import load_model

    model = load_model("lisa-tiny")
    torch.manual_seed(0)
    plain = pretrain_vision(model, steps=2, batch_size=4, images=8, seed=5, image_size=64, held_out=4, log=None)
    assert plain.position_accuracy is None and "position_accuracy" not in plain.to_dict()
    model = load_model("lisa-tiny")
    torch.manual_seed(0)
    result = _pretrain_changes_only(model, "vlm.vision_tower.", steps=80, batch_size=16, lr=3e-3, images=100,
                                    seed=5, image_size=64, held_out=20, log=None, position_weight=1.0)
    g = model.config.vision.image_size // model.config.vision.clip["patch_size"]
    # CLIP adds a position embedding to every patch: read back, it is far above the 1/g of a guess
    assert set(result.position_accuracy) == {"row", "column"}
    assert min(result.position_accuracy.values()) > 2.0 / g, (result.position_accuracy, g)
    assert result.to_dict()["position_accuracy"] == result.position_accuracy


def test_stage_with_a_region_weight_pulls_region_vectors_to_their_names():
    # A GLaMM model's region encoder joins the stage: its vectors for each object's box move towards the LLM's
    # embedding of the object's full name; the LLM (whose embeddings are the targets) does not change.
    from groundseg.config import preset_config
    from groundseg.datasets.shapes import ShapesWorld
    from groundseg.hub import ASSETS, build_model, load_tokenizer
    from groundseg.train.probes import name_alignment_loss
    from groundseg.train.vision_pretrain import _Regions

    tok = load_tokenizer(ASSETS / "shapes-demo")
    torch.manual_seed(0)
    model = build_model(preset_config("glamm-shapes"), tok)
    regions = _Regions(model)
    x, _ = make_images(vision_tower(model), 3, 24, 96, each=regions.add)
    item = ShapesWorld(seed=3, image_size=96).image(2)  # the cached boxes and names are the objects' own
    assert [tok.decode([int(t)]) for t in regions.names[2]] == [f" {o.size} {o.color} {o.shape}" for o in item.objects]
    assert torch.allclose(regions.boxes[2] * 96, torch.tensor([o.box for o in item.objects], dtype=torch.float32))

    def distance() -> float:
        with torch.no_grad():
            _, levels = regions.tower_pass(x.float(), model.config.vision.select_layer)
            vec, ids = regions.vectors(levels, list(range(24)))
            return float(name_alignment_loss(vec, ids, regions.embeddings()))

    llm = {k: v.clone() for k, v in model.vlm.language_model.state_dict().items()}
    before = distance()
    result = pretrain_vision(model, 30, batch_size=8, lr=3e-3, images=20, seed=3, image_size=96, held_out=4,
                             log=None, region_weight=1.0)
    assert distance() < 0.5 * before
    assert all(torch.equal(v, model.vlm.language_model.state_dict()[k]) for k, v in llm.items())
    assert 0.0 <= result.region_name_accuracy <= 1.0 and "region_name_accuracy" in result.to_dict()
    assert not hasattr(model.vlm.vision_tower, "regions") and hasattr(model, "region_encoder")
    with pytest.raises(ValueError, match="region encoder"):
        pretrain_vision(build_model(preset_config("shapes-demo"), tok), 1, images=2, held_out=0, log=None,
                        region_weight=1.0)


def test_a_run_refuses_region_pretraining_without_a_region_encoder(tmp_path):
    cfg = trainer.TrainConfig(out=str(tmp_path / "run"), model="lisa-tiny", dataset="shapes", steps=1,
                              progress=False, vision_pretrain_steps=2, vision_pretrain_region_weight=1.0)
    with pytest.raises(trainer.InputError, match="--vision-pretrain-region-weight 1.0: lisa-tiny has no region"):
        trainer.train(cfg)
    assert not (tmp_path / "run").exists()
