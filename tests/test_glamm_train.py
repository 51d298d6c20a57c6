"""Training support for GLaMM tasks: shapes GCG / region-caption samples, collation of <bbox> boxes, and a GLaMM
model learning from them (a few steps on one batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groundseg import InputError, load_model
from groundseg.config import GLAMM_GCG_PROMPT
from groundseg.datasets.shapes import SHAPES
from groundseg.grounding.glamm import gcg_pairs
from groundseg.train.data import Collator, ShapesSource, TrainSample


@pytest.fixture(scope="module")
def samples():
    src = ShapesSource(seed=1, image_size=96, tasks={"gcg": 1, "regcap": 1})
    return [src.sample(np.random.default_rng([7, k])) for k in range(6)]


def test_shapes_gcg_and_region_caption_samples(samples):
    tasks = {s.task for s in samples}
    assert tasks == {"gcg", "regcap"}
    for s in samples:
        if s.task == "gcg":
            (q, a), = s.conversations
            assert q == GLAMM_GCG_PROMPT and "<p> " in a and " </p> [SEG]" in a
            pairs = gcg_pairs(a)
            assert len(pairs) == len(s.masks) and all(p is not None for p, _ in pairs)
            assert s.boxes is None
        else:
            assert len(s.masks) == 0 and len(s.boxes) == len(s.conversations)
            for (q, a), b in zip(s.conversations, s.boxes):
                assert q.count("<bbox>") == 1 and b.shape == (1, 4)
                x1, y1, x2, y2 = b[0]
                assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
                assert a.split()[-1] in SHAPES  # names its shape


def test_train_sample_checks_bbox_count():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="conversation 0 has 2 <bbox> but 1 boxes"):
        TrainSample(img, [("<bbox> and <bbox>?", "x")], np.zeros((0, 8, 8), bool), "regcap",
                    boxes=[np.zeros((1, 4))])
    with pytest.raises(ValueError, match="has 1 <bbox> but 0 boxes"):
        TrainSample(img, [("What is in <bbox>?", "x")], np.zeros((0, 8, 8), bool), "regcap")


def test_collated_boxes_prefix_and_learning(samples):
    torch.manual_seed(0)
    m = load_model("glamm-shapes")  # small region maps (16 and 8 cells): a few training steps stay cheap
    batch = Collator(m.config, m.tokenizer)(samples)
    rows = [(s, k) for s in samples for k in range(len(s.conversations))]
    assert len(batch.region_boxes) == len(rows)
    for (s, k), got in zip(rows, batch.region_boxes):
        if s.boxes is None:
            assert got is None
        else:
            h, w = s.image.shape[:2]
            assert torch.allclose(got, torch.tensor(s.boxes[k]) / torch.tensor([w, h, w, h]))
    prompt = m.tokenizer.decode([t for t in batch.input_ids[0].tolist() if t >= 0])
    assert "provides an overview of the picture." in prompt  # GLaMM's first-turn wording
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(4):
        out = m(batch)
        if step == 0:
            out["loss"].backward()
            g = m.region_encoder.roi_align.updims.weight.grad
            assert g is not None and g.abs().sum() > 0  # the region-caption CE reaches the region encoder
            opt.zero_grad()
            out = m(batch)
        losses.append(out["loss"].item())
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] * 0.9, losses


def test_lisa_refuses_region_batches(samples):
    m = load_model("lisa-tiny")
    batch = Collator(m.config, m.tokenizer)([s for s in samples if s.task == "regcap"][:1])
    with pytest.raises(InputError, match="lisa family has no region encoder"):
        m(batch)


def test_init_from_copies_the_shared_tensors_and_keeps_the_region_encoder(tmp_path):
    # A trained LISA of the same sizes starts a GLaMM: every tensor both have is copied, the region encoder keeps
    # its seeded initial values; a model with nothing in common is a one-line error.
    import torch

    from groundseg.hub import load_model, save_pretrained
    from groundseg.io import InputError
    from groundseg.train.trainer import TrainConfig, build_for_training, init_weights

    lisa = load_model("lisa-tiny")
    with torch.no_grad():
        for p in lisa.parameters():
            p.add_(0.5)  # differs from every seeded initialisation
    save_pretrained(lisa, tmp_path / "lisa")
    fresh, _ = build_for_training(TrainConfig(model="glamm-tiny", from_scratch=True, lora=False, train_all=True))
    model, _ = build_for_training(TrainConfig(model="glamm-tiny", from_scratch=True, lora=False, train_all=True,
                                              init_from=str(tmp_path / "lisa")))
    ours, src, init = model.state_dict(), lisa.state_dict(), fresh.state_dict()
    shared = [k for k in ours if k in src and ours[k].shape == src[k].shape]
    assert len(shared) > 100
    for k in ours:  # copied where name and shape agree, seeded initial values elsewhere
        assert torch.equal(ours[k], src[k] if k in shared else init[k]), k
    region = [k for k in ours if k.startswith("region_encoder.")]
    assert region and all(torch.equal(ours[k], init[k]) for k in region)
    with pytest.raises(InputError, match="no tensor of it matches"):
        init_weights(load_model("sa2va-tiny"), str(tmp_path / "lisa"))
    # init_exclude: the vision tower keeps its seeded values too (glamm-shapes pretrains it from those)
    partial, _ = build_for_training(TrainConfig(model="glamm-tiny", from_scratch=True, lora=False, train_all=True,
                                                init_from=str(tmp_path / "lisa"), init_exclude=["vlm.vision_tower."]))
    got = partial.state_dict()
    tower = [k for k in got if k.startswith("vlm.vision_tower.")]
    assert tower and all(torch.equal(got[k], init[k]) for k in tower)
    assert all(torch.equal(got[k], src[k]) for k in shared if not k.startswith("vlm.vision_tower."))


def test_region_probe_reads_each_boxs_region_vector():
    # regcap samples carry their boxes' object classes in region-vector order; the probe adds, per box, the CE of
    # those classes read off the region vector -- with a zeroed probe exactly log(7) + log(7) + log(3) per box.
    import math

    import torch

    from groundseg.datasets.shapes import COLORS, SHAPES, SIZES, ShapesWorld
    from groundseg.train.data import ShapesSource
    from groundseg.train.probes import ProbedModel

    src = ShapesSource(seed=4, image_size=64, tasks={"regcap": 1, "refer": 1}, max_expressions=2)
    samples = [src.sample(np.random.default_rng(k)) for k in range(4)]
    boxed = [s for s in samples if s.boxes is not None]
    assert boxed and len(boxed) < len(samples)
    model = load_model("glamm-tiny")
    batch = Collator(model.config, model.tokenizer)(samples)
    n_boxes = sum(len(b) for s in boxed for b in s.boxes)
    assert batch.region_attributes.shape == (n_boxes, 3)
    # each row names its box's object: the answer ("a large red circle") holds those classes' words
    answers = [a for s in boxed for _, a in s.conversations]
    for (c, sh, sz), ans in zip(batch.region_attributes.tolist(), answers):
        assert f"{list(SIZES)[sz - 1]} {list(COLORS)[c - 1]} {SHAPES[sh - 1]}" in ans
    torch.manual_seed(0)
    plain = ProbedModel(model, 1.0)
    probed = ProbedModel(model, 1.0, region_weight=0.5)
    probed.probes.load_state_dict(plain.probes.state_dict())
    torch.nn.init.zeros_(probed.region_probe.weight)
    torch.nn.init.zeros_(probed.region_probe.bias)
    model.eval()  # no dropout: both passes see the same model
    with torch.no_grad():
        base, out = plain(batch), probed(batch)
    expected = 0.5 * (2 * math.log(7) + math.log(3))  # mean over boxes of the uniform CE, summed over the heads
    assert float(out["attr_loss"] - base["attr_loss"]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="region encoder"):
        ProbedModel(load_model("lisa-tiny"), 1.0, region_weight=1.0)


def test_name_token_tables_index_the_one_token_names():
    from groundseg.datasets.shapes import COLORS, SIZES
    from groundseg.hub import ASSETS, load_tokenizer
    from groundseg.train.probes import name_token_tables

    tok = load_tokenizer(ASSETS / "shapes-demo")
    short, full = name_token_tables(tok)
    assert short.shape == (len(COLORS) + 1, len(SHAPES) + 1) and full.shape == (len(SIZES) + 1, *short.shape)
    assert (short[0] == -1).all() and (short[:, 0] == -1).all() and (full[0] == -1).all()
    assert tok.decode([int(short[1, 1])]) == " red circle"  # 1-based classes: COLORS[0], SHAPES[0]
    assert tok.decode([int(short[6, 4])]) == " orange star"
    assert tok.decode([int(full[2, 3, 5])]) == " large blue hexagon"
    assert len(set(short[1:, 1:].flatten().tolist()) | set(full[1:, 1:, 1:].flatten().tolist())) == 36 + 72
    with pytest.raises(ValueError, match="one-token object names.*' red circle' as [2-9] tokens"):
        name_token_tables(load_tokenizer(ASSETS / "lisa-tiny"))


def test_name_losses_against_hand_computed_values():
    from groundseg.train.probes import name_alignment_loss, name_direction_loss

    emb = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    vec = torch.tensor([[3.0, 1.0], [0.0, 0.0], [5.0, 5.0]])
    ids = torch.tensor([0, 1, -1])
    # (|(0, 1)|^2 + |(0, -4)|^2) / 2 over (9 + 16) / 2
    assert float(name_alignment_loss(vec, ids, emb)) == pytest.approx(17 / 25)
    assert float(name_alignment_loss(vec, torch.tensor([-1, -1, -1]), emb)) == 0.0
    # 1 - cos: (3, 1) vs (3, 0) -> 1 - 3 / sqrt(10); the zero vector's cos is 0 -> 1; (5, 5) vs (1, 1) -> 0
    d = name_direction_loss(vec, torch.tensor([0, 1, 2]), emb)
    assert float(d) == pytest.approx(((1 - 3 / 10 ** 0.5) + 0 + 1) / 3, rel=1e-6)
    assert float(name_direction_loss(vec[None], torch.tensor([[-1, -1, 2]]), emb)) == pytest.approx(0.0, abs=1e-6)


def test_probed_glamm_adds_name_losses_for_the_boxes_and_object_tokens():
    # Independent of the class tables: the target of each region vector is the token of its answer's name
    # ("a large red circle" -> " large red circle"); an image token's is its patch's colour-and-shape name.
    from groundseg.config import preset_config
    from groundseg.datasets.shapes import COLORS
    from groundseg.hub import ASSETS, build_model, load_tokenizer
    from groundseg.train.probes import ProbedModel

    tok = load_tokenizer(ASSETS / "shapes-demo")
    torch.manual_seed(0)
    model = build_model(preset_config("glamm-shapes"), tok).eval()
    src = ShapesSource(seed=3, image_size=96, tasks={"regcap": 1}, max_expressions=2)
    samples = [src.sample(np.random.default_rng(k)) for k in range(2)]
    batch = Collator(model.config, tok)(samples)
    probed = ProbedModel(model, 1.0, name_weight=0.5, token_name_weight=0.25)
    with torch.no_grad():
        out = probed(batch)
    emb = model.vlm.language_model.get_input_embeddings().weight.detach()
    names = [a.split(" ", 1)[1] for s in samples for _, a in s.conversations]
    target = emb[[tok(" " + n, add_special_tokens=False).input_ids[0] for n in names]]
    vec = out["region_vectors"]
    assert vec.shape == target.shape
    expected = (vec - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
    assert float(out["name_loss"]) == pytest.approx(0.5 * float(expected), rel=1e-5)
    cos, n = [], 0
    tokens, maps = out["image_tokens"], batch.token_attribute_maps.flatten(2)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            c, k = int(maps[b, 0, t]), int(maps[b, 1, t])
            if c and k:
                e = emb[tok(f" {list(COLORS)[c - 1]} {SHAPES[k - 1]}", add_special_tokens=False).input_ids[0]]
                cos.append(float(torch.nn.functional.cosine_similarity(tokens[b, t], e, dim=0)))
    assert cos and float(out["token_name_loss"]) == pytest.approx(0.25 * (1 - np.mean(cos)), rel=1e-4)
    assert float(out["attr_loss"]) > float(out["name_loss"] + out["token_name_loss"])  # the probes' CE as well


def test_name_weights_need_a_probed_glamm(tmp_path):
    from groundseg.train import trainer

    for kw, flag in ((dict(name_weight=1.0), "--name-weight 1.0"),
                     (dict(token_name_weight=0.5), "--token-name-weight")):
        cfg = trainer.TrainConfig(out=str(tmp_path / "run"), model="lisa-tiny", dataset="shapes", steps=1,
                                  attribute_weight=1.0, progress=False, **kw)
        with pytest.raises(trainer.InputError, match=f"{flag}.*only for GLaMM models with --attribute-weight > 0"):
            trainer.train(cfg)
    assert not (tmp_path / "run").exists()
