"""The training stack: collation and labels, data mixing, the schedule, a short run that learns, exact resume,
LoRA merge, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groundseg.grounding.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from groundseg.io import InputError
from groundseg.train import trainer
from groundseg.train.data import Collator, MixedSource, ShapesSource, TrainSample, build_source


@pytest.fixture(scope="module")
def tiny():
    from groundseg import load_model

    return load_model("lisa-tiny")


def tiny_cfg(tmp_path, **kw) -> trainer.TrainConfig:
    # lisa-tiny (64-pixel SAM) on 64-pixel shapes images: a few seconds per run on 2 cores
    base = dict(out=str(tmp_path / "run"), model="lisa-tiny", dataset="shapes", shapes_tasks={"refer": 1},
                steps=6, batch_size=2, lr=2e-3, warmup_steps=1, save_every=3, log_every=1, progress=False,
                lora=True, trainable=["lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs"])
    base.update(kw)
    return trainer.TrainConfig(**base)


@pytest.fixture()
def small_shapes(monkeypatch):
    """Shapes sources at 64 pixels (the tiny SAM's input size)."""
    real = build_source

    def build(*args, **kw):
        kw["image_size"] = 64
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "build_source", build)


def test_labels_cover_only_the_answer(tiny):
    col = Collator(tiny.config, tiny.tokenizer)
    img = np.zeros((40, 50, 3), np.uint8)
    masks = np.zeros((2, 40, 50), bool)
    masks[0, :10], masks[1, 20:] = True, True
    sample = TrainSample(img, [("Segment the top.", "Sure, [SEG]."), ("and the bottom", "It is [SEG].")], masks)
    batch = col([sample])
    assert batch.input_ids.shape[0] == 2 and batch.offset.tolist() == [0, 2]
    assert batch.gt_masks[0].shape == (2, 40, 50) and batch.original_sizes == [(40, 50)]
    for row, answer in zip(range(2), ["Sure, [SEG].", "It is [SEG]."]):
        ids, labels = batch.input_ids[row], batch.labels[row]
        keep = labels != IGNORE_INDEX
        # the labelled span is exactly the answer and EOS, at the end of the real (unpadded) ids
        text = tiny.tokenizer.decode(labels[keep][:-1].tolist()).strip()
        assert text == answer
        assert labels[keep][-1].item() == tiny.eos_id
        n_real = int((ids != tiny.pad_id).sum())
        assert keep.nonzero().max().item() == n_real - 1
        # the prompt, including the image placeholder, is never a target
        assert (labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
        prompt = tiny.prompt_tokenizer(tiny.chat_prompt(["Segment the top.", "and the bottom"][row]))
        assert ids[:len(prompt)].tolist() == prompt  # the same prefix ids as inference
        assert (labels[:len(prompt)] == IGNORE_INDEX).all()


def test_ce_ignores_image_and_prompt_positions(tiny):
    """The CE of a batch equals a cross-entropy computed by hand over the answer positions only."""
    col = Collator(tiny.config, tiny.tokenizer)
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    batch = col([TrainSample(img, [("What is this?", "A picture.")], np.zeros((0, 64, 64), bool))])
    with torch.no_grad():
        out = tiny(batch)
        feats = tiny.vlm.encode_images(batch.clip_pixel_values)
        emb = tiny.vlm.embed(batch.input_ids, feats, tiny.pad_id, batch.labels)
        states, _ = tiny.vlm.run(emb.inputs_embeds, emb.attention_mask)
        logp = tiny.vlm.logits(states)[0].log_softmax(-1)
    targets = [(t - 1, int(emb.labels[0, t])) for t in range(1, emb.labels.shape[1])
               if emb.labels[0, t] != IGNORE_INDEX]
    assert len(targets) == len(tiny.tokenizer(" A picture.", add_special_tokens=False).input_ids) + 1
    by_hand = -torch.stack([logp[p, y] for p, y in targets]).mean()
    torch.testing.assert_close(out["ce_loss"], by_hand, rtol=1e-5, atol=1e-6)
    assert out["mask_bce_loss"] == 0 and out["mask_dice_loss"] == 0  # no masks, no mask loss


def test_shapes_samples_are_deterministic_and_consistent():
    src = MixedSource([ShapesSource(seed=3, image_size=64)], [1.0], seed=5)
    a, b = src[17], src[17]
    assert np.array_equal(a.image, b.image) and a.conversations == b.conversations
    assert np.array_equal(a.masks, b.masks)
    tasks = {src[k].task for k in range(40)}
    assert tasks == {"refer", "multi", "caption", "box"}
    for k in range(40):
        s = src[k]
        if s.task == "box":
            assert len(s.masks) == 0 and "<box>" in s.conversations[0][1]
        else:
            assert s.masks.any(axis=(1, 2)).all()  # every [SEG] has a non-empty mask
        if s.task == "multi":
            assert s.conversations[0][1].count("[SEG]") >= 2


def test_sample_rates_are_honoured():
    class Const:
        def __init__(self, name):
            self.name = name

        def sample(self, rng):
            return TrainSample(np.zeros((2, 2, 3), np.uint8), [], np.zeros((0, 2, 2), bool), self.name)

    src = MixedSource([Const("a"), Const("b"), Const("c"), Const("d")], [9, 3, 3, 1], seed=0)
    counts = {n: 0 for n in "abcd"}
    for k in range(4000):
        counts[src[k].task] += 1
    for n, r in zip("abcd", [9, 3, 3, 1]):
        assert abs(counts[n] / 4000 - r / 16) < 0.03, counts


def test_unknown_and_planned_datasets_are_refused():
    from groundseg.io import InputError

    with pytest.raises(InputError, match="vqa: not available"):
        build_source("shapes||vqa", [1, 1], 0)
    with pytest.raises(InputError, match="unknown"):
        build_source("nope", None, 0)
    with pytest.raises(InputError, match="2 datasets but 1 sample rates"):
        build_source("shapes||shapes", [1], 0)


def test_schedule_warmup_then_linear_decay():
    f = trainer.lr_lambda(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(9) - 0.55) < 1e-9 and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_time_budget_drives_the_decay_and_counts_earlier_runs():
    t = [100.0]
    clock = trainer.TimeBudget(2.0, spent=30.0, now=lambda: t[0])  # 120 s, of which 30 s used before a resume
    assert clock.elapsed() == 30.0 and not clock.up()
    clock.start()
    t[0] += 30.0
    assert clock.fraction() == pytest.approx(0.5)
    f = trainer.lr_lambda(warmup=4, total=104, min_ratio=0.1, clock=clock)
    assert f(1) == 0.5  # warm-up is by steps only
    assert f(54) == pytest.approx(0.55)  # steps (half done) and time (half used) agree
    assert f(14) == pytest.approx(0.55)  # steps 10% along, time 50%: time decides
    t[0] += 60.0
    assert clock.up() and f(14) == pytest.approx(0.1)
    with pytest.raises(InputError, match="--time-limit 0: expected a positive"):
        trainer.TimeBudget(0)


def test_time_limit_ends_the_run_exported(tmp_path, small_shapes):
    # A limit shorter than one step: the run stops after its first step, logs it, checkpoints it with the time
    # used, and exports the model as a finished run does.
    out = trainer.train(tiny_cfg(tmp_path, steps=50, time_limit=1e-6, save_every=50))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    state = json.loads((out / "checkpoints" / "step_000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["elapsed_s"] > 0
    assert (out / "final" / "model.safetensors").is_file()
    # resuming a run that has nothing left to do exports again and trains nothing
    (out / "final" / "model.safetensors").unlink()
    trainer.train(tiny_cfg(tmp_path, steps=1, time_limit=1e-6, save_every=50), resume=True)
    assert (out / "final" / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(InputError, match="--time-limit -1: expected a positive"):
        trainer.train(tiny_cfg(tmp_path / "neg", time_limit=-1.0))


def test_short_run_lowers_the_loss(tmp_path, small_shapes):
    cfg = tiny_cfg(tmp_path, steps=40, save_every=40, lora=False, train_all=True, lr=3e-3, warmup_steps=5)
    out = trainer.train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = np.mean([r["loss"] for r in rows[:5]])
    last = np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.5 * first, (first, last)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_continues_with_the_same_losses(tmp_path, small_shapes):
    straight = trainer.train(tiny_cfg(tmp_path / "a"))
    trainer.train(tiny_cfg(tmp_path / "b", stop_at=3))
    assert not (tmp_path / "b" / "run" / "final").exists()  # stopped early: no export
    # a crash after the checkpoint: rows logged past it must not appear twice after the resume
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    resumed = trainer.train(tiny_cfg(tmp_path / "b"), resume=True)
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)


def test_processes_get_disjoint_samples_covering_the_stream():
    # 3 processes, micro-batches of 2, 4 micro-batches each: every sample index 0..23 exactly once
    got = [k for r in range(3) for m in range(4) for k in trainer._Batches.indices(m, r, 3, 2)]
    assert sorted(got) == list(range(24))
    assert list(trainer._Batches.indices(1, 2, 3, 2)) == [10, 11]  # (m * W + r) * B


def test_lora_merge_gives_the_same_outputs(tiny):
    from groundseg.train.lora import apply_lora, has_lora, merge_lora, set_trainable

    model = trainer.build_for_training(trainer.TrainConfig(model="lisa-tiny"))[0]
    assert has_lora(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("mask_decoder" in n for n in names)
    assert not any("vision_tower" in n or "image_encoder" in n or "prompt_encoder" in n for n in names)
    assert not any("lora" in n for n in names if "language_model" not in n)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so the merge has something to fold in
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    col = Collator(model.config, model.tokenizer)
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    batch = col([TrainSample(img, [("Segment it.", "Sure, [SEG].")], np.ones((1, 64, 64), bool))])
    with torch.no_grad():
        before = model(batch)
        merge_lora(model)
        after = model(batch)
    assert not has_lora(model)
    assert not any("lora" in k for k in model.state_dict())
    for k in ("ce_loss", "mask_bce_loss", "mask_dice_loss"):
        torch.testing.assert_close(before[k], after[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(before["pred_masks"][0], after["pred_masks"][0], rtol=1e-4, atol=1e-4)
    # and the merged model saves in our plain format (the keys of a model that never had adapters)
    assert set(model.state_dict()) == set(tiny.state_dict())


def test_train_cli_errors(tmp_path, capsys, monkeypatch):
    from groundseg.cli import main

    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["train", "--dataset", "vqa", "--steps", "1", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "vqa" in capsys.readouterr().err
    assert main(["train", "--log-every", "0", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--log-every 0: expected at least 1" in capsys.readouterr().err
    assert main(["train", "--shapes-tasks", "refer=0", "--steps", "1", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "positive sum" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["train", "--config", str(tmp_path / "list.json")]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    # a second stage whose first stage has not run (its init_from is relative to the working directory)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "sa2va-shapes", "--out", "r2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no such folder (it is made by the first stage: groundseg train --preset sa2va-shapes-keys)" in err


def test_cli_values_override_the_recipe():
    import argparse

    from groundseg.train.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--preset", "shapes-demo", "--steps", "7", "--sample-rates", "3,1"]))
    assert cfg.steps == 7 and cfg.model == "shapes-demo" and cfg.from_scratch and not cfg.lora
    assert cfg.sample_rates == [3.0, 1.0]
    assert config_from_args(p.parse_args([])).steps == trainer.TrainConfig().steps
    g = config_from_args(p.parse_args(["--preset", "glamm-shapes", "--init-exclude", "a.,b.",
                                       "--vision-pretrain-steps", "3"]))
    assert g.init_exclude == ["a.", "b."] and g.vision_pretrain_steps == 3
    assert g.vision_pretrain_lr == trainer.RECIPES["glamm-shapes"]["vision_pretrain_lr"]


def test_refer_seg_from_disk_mixed_with_shapes(tmp_path):
    """LISA's refer_seg source reads a REFER dataset written to disk (here the shapes world) and mixes with the
    on-the-fly shapes source by rate."""
    from groundseg.datasets.shapes import write_shapes

    write_shapes(tmp_path / "data", seed=2, images=6, image_size=64)
    src = build_source("refer_seg||shapes", [3, 1], 0, data_root=str(tmp_path / "data"), refer_datasets="shapes",
                       image_size=64)
    tasks = [src[k].task for k in range(40)]
    assert {"refer_seg", "refer", "multi", "caption", "box"} >= set(tasks) and tasks.count("refer_seg") > 20
    s = next(src[k] for k in range(40) if src[k].task == "refer_seg")
    assert s.image.shape == (64, 64, 3) and len(s.masks) == len(s.conversations) and s.masks.any(axis=(1, 2)).all()
    cfg = tiny_cfg(tmp_path, dataset="refer_seg", data_root=str(tmp_path / "data"), refer_datasets="shapes",
                   steps=2, save_every=2)
    out = trainer.train(cfg)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_refer_answers_name_the_target_whatever_the_question():
    # "the square left of the green star" is answered "... the blue square [SEG]": the phrase before [SEG] is the
    # target's own shortest unique name, so the decoder never sees the anchor's noun there.
    src = ShapesSource(seed=0, image_size=128, tasks={"refer": 1}, max_expressions=8)
    seen_kinds = set()
    for i in range(12):
        item = src.world.image(i)
        names = src._names_for(item)
        kinds = {e.text: e.kind for e in item.expressions}
        s = src._refer(item, np.random.default_rng(i))
        if s is None:
            continue
        for (q, a), mask in zip(s.conversations, s.masks):
            target = next(o for o in item.objects if np.array_equal(o.mask, mask))
            expr = next(t for t in sorted(kinds, key=len, reverse=True) if t in q)
            seen_kinds.add(kinds[expr])
            named = expr if kinds[expr] == "attribute" else names[target.id]
            assert a.replace("Sure, ", "").replace("It is ", "") == f"{named} [SEG]."
    assert {"attribute", "relational", "ordinal"} <= seen_kinds


def test_objects_task_names_every_object_in_the_caption_order():
    from groundseg.datasets.shapes import COLORS, SHAPES, SIZES

    src = ShapesSource(seed=0, image_size=128, tasks={"objects": 1})
    item = next(it for it in (src.world.image(i) for i in range(20))
                if len(it.objects) >= 3 and len({o.color for o in it.objects}) >= 2)
    names = src._names_for(item)
    s = src._objects(item, np.random.default_rng(0))
    # Colour (COLORS order), shape, size, then left to right: the grounded caption's order.
    objs = sorted((o for o in item.objects if o.id in names),
                  key=lambda o: (list(COLORS).index(o.color), SHAPES.index(o.shape), list(SIZES).index(o.size),
                                 o.center[0]))
    assert s.conversations[0][1].count("[SEG]") == len(objs) == len(s.masks)
    pos = [s.conversations[0][1].index(f"{names[o.id]} [SEG]") for o in objs]
    assert pos == sorted(pos)
    for o, m, attrs in zip(objs, s.masks, s.mask_attributes):
        assert np.array_equal(m, o.mask)
        assert tuple(attrs) == (list(COLORS).index(o.color) + 1, list(SHAPES).index(o.shape) + 1,
                                list(SIZES).index(o.size) + 1)
        assert (s.attribute_map[1][o.mask] == attrs[1]).all()
    background = ~np.any([o.mask for o in item.objects], axis=0)
    assert (s.attribute_map[:, background] == 0).all()


def test_grid_labels_sample_pixel_centres_and_ignore_the_padding():
    from groundseg.train.data import grid_labels

    amap = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    # a 4x4 image shown at 4x4 inside an 8x8 SAM input; the 4x4 grid covers it with 2x2 cells
    out = grid_labels(amap, (4, 4), image_size=8, grid=4)
    assert out.dtype == np.int64 and out.shape == (1, 4, 4)
    assert out[0, :2, :2].tolist() == [[5, 7], [13, 15]]  # centres of cells 0, 1 -> source pixels 1, 3
    assert (out[0, 2:] == IGNORE_INDEX).all() and (out[0, :, 2:] == IGNORE_INDEX).all()


def test_attribute_probe_losses_against_hand_values():
    import math

    from groundseg.train.probes import AttributeProbes

    probes = AttributeProbes(8, 4, (7, 7, 3))
    for p in probes.parameters():
        torch.nn.init.zeros_(p)  # uniform logits: every head's CE is log(its class count)
    maps = torch.full((2, 3, 4, 4), IGNORE_INDEX)
    maps[0, :, 0, 0] = torch.tensor([1, 2, 1])
    maps[1, :, 3, 3] = torch.tensor([0, 0, 2])
    image, prompt = probes.losses(torch.randn(2, 8, 2, 2), torch.randn(3, 4), maps,
                                  torch.tensor([[1, 1, 1], [2, 2, 2], [6, 6, 2]]))
    expected = 2 * math.log(7) + math.log(3)
    assert image.item() == pytest.approx(expected, rel=1e-6)
    assert prompt.item() == pytest.approx(expected, rel=1e-6)
    # a confident, correct probe has (almost) no loss
    with torch.no_grad():
        probes.prompt.bias[:] = -20
        probes.prompt.bias[[1, 7 + 1, 14 + 1]] = 20
    _, prompt = probes.losses(torch.randn(1, 8, 2, 2), torch.randn(1, 4), maps[:1], torch.tensor([[1, 1, 1]]))
    assert prompt.item() < 1e-6


def test_attribute_probes_train_and_stay_out_of_the_export(tmp_path, small_shapes):
    from safetensors import safe_open

    from groundseg import load_model

    out = trainer.train(tiny_cfg(tmp_path, steps=2, attribute_weight=0.5, shapes_tasks={"objects": 1, "refer": 1}))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["attr_loss"] > 0 for r in rows)
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("probes" in k for k in keys) and not any(k.startswith("model.") for k in keys)
    load_model(out / "final")


def test_crop_grid_labels_take_patch_centres_of_the_centre_square():
    from groundseg.train.data import crop_grid_labels

    amap = np.arange(24, dtype=np.uint8).reshape(1, 4, 6)
    # the tower sees columns 1..4 (centre 4x4 square); 2x2 patches of 2 px, centres at rows 1, 3 and cols 2, 4
    out = crop_grid_labels(amap, 2)
    assert out.dtype == np.int64 and out.tolist() == [[[8, 10], [20, 22]]]


def test_token_probe_is_opt_in_and_sees_the_image_tokens(tmp_path):
    # Without --token-attribute-weight the probed model is built exactly as before (shapes-demo's recipe draws the
    # same random numbers); with it, the loss grows by the CE of the LLM's image tokens, computed here by hand
    # with the probe set to predict uniformly.
    from groundseg import load_model
    from groundseg.train.data import Collator, ShapesSource
    from groundseg.train.probes import ProbedModel

    model = load_model("lisa-tiny")
    torch.manual_seed(0)
    plain = ProbedModel(model, 1.0)
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    ProbedModel(model, 1.0, 0.0)
    assert torch.equal(torch.rand(1), after_plain) and not hasattr(plain, "token_probe")
    probed = ProbedModel(model, 1.0, 0.5)
    probed.probes.load_state_dict(plain.probes.state_dict())  # the same two original probes
    torch.nn.init.zeros_(probed.token_probe.weight)
    torch.nn.init.zeros_(probed.token_probe.bias)
    src = ShapesSource(seed=1, image_size=64, tasks={"refer": 1})
    batch = Collator(model.config, model.tokenizer)([src.sample(np.random.default_rng(k)) for k in range(2)])
    g = model.config.vision.image_size // model.config.vision.clip["patch_size"]
    assert batch.token_attribute_maps.shape == (2, 3, g, g)
    torch.manual_seed(1)
    base = plain(batch)
    torch.manual_seed(1)
    out = probed(batch)
    import math

    expected = 0.5 * (2 * math.log(7) + math.log(3))  # uniform logits: log of each head's class count
    assert float(out["attr_loss"] - base["attr_loss"]) == pytest.approx(expected, rel=1e-5)


def test_every_documented_recipe_builds_a_config_of_a_known_preset():
    from groundseg.config import PRESETS, SA2VA_PRESETS

    assert set(trainer.RECIPES) == {"shapes-demo", "glamm-shapes", "sa2va-shapes-keys", "sa2va-shapes"}
    for name, recipe in trainer.RECIPES.items():
        cfg = trainer.TrainConfig(**recipe)
        stage_of = {"sa2va-shapes-keys": "sa2va-shapes"}.get(name, name)  # a first stage names its model
        assert cfg.model == stage_of and (stage_of in PRESETS or stage_of in SA2VA_PRESETS)
        assert cfg.out == f"runs/{name}" and cfg.from_scratch
    assert trainer.RECIPES["sa2va-shapes"]["shapes_tasks"]["video"] > 0
    assert trainer.RECIPES["sa2va-shapes"]["init_from"] == "runs/sa2va-shapes-keys/final"
    assert trainer.RECIPES["glamm-shapes"]["init_from"] == "shapes-demo"
    assert trainer.RECIPES["glamm-shapes"]["vision_pretrain_steps"] > 0
    assert trainer.RECIPES["sa2va-shapes-keys"]["vision_pretrain_steps"] > 0  # SAM2 learns shape first


def test_shapes_kinds_restrict_questions_to_copyable_names():
    # --shapes-kinds attribute: every referring and video answer repeats the question's own expression (what a
    # from-scratch LLM learns to copy first); an unknown kind is one clear error.
    src = ShapesSource(seed=3, image_size=64, tasks={"refer": 1, "video_keys": 1}, max_expressions=1,
                       kinds=("attribute",))
    rng = np.random.default_rng(2)
    tasks = set()
    for _ in range(16):
        s = src.sample(rng)
        (q, a), = s.conversations
        name = a[a.index("the "):a.index(" [SEG]")]
        assert name in q, (q, a)
        tasks.add(len(s.frames) if s.frames is not None else 1)
    assert tasks == {1, 5}
    every = ShapesSource(seed=3, image_size=64, tasks={"refer": 1}, max_expressions=1)
    assert any(s.conversations[0][1][s.conversations[0][1].index("the "):s.conversations[0][1].index(" [SEG]")]
               not in s.conversations[0][0] for s in (every.sample(rng) for _ in range(40)))
    with pytest.raises(InputError, match="--shapes-kinds colour: expected kinds among attribute, motion"):
        ShapesSource(kinds=("colour",))


def test_loader_workers_run_opencv_on_one_thread():
    # Thirteen workers each running OpenCV on every core would oversubscribe the machine the training runs on.
    import cv2

    from groundseg.train.trainer import _quiet_worker

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        _quiet_worker(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


def test_position_probe_reads_each_image_tokens_row_and_column(tmp_path):
    # --token-position-weight: a linear probe on the LLM's image tokens predicts each token's (row, column) in the
    # patch grid. With the probe zeroed the loss is the uniform 2 log g, weighted; it trains the tower through the
    # tokens; and it needs --attribute-weight (the probes' wrapper), a clear error otherwise.
    import math

    from groundseg import load_model
    from groundseg.train.data import Collator, ShapesSource
    from groundseg.train.probes import ProbedModel

    model = load_model("lisa-tiny")
    probed = ProbedModel(model, 1.0, 0.0, 0.0, position_weight=0.25)
    g = model.config.vision.image_size // model.config.vision.clip["patch_size"]
    assert probed.position_probe.out_features == 2 * g
    torch.nn.init.zeros_(probed.position_probe.weight)
    torch.nn.init.zeros_(probed.position_probe.bias)
    src = ShapesSource(seed=1, image_size=64, tasks={"refer": 1})
    batch = Collator(model.config, model.tokenizer)([src.sample(np.random.default_rng(k)) for k in range(2)])
    out = probed(batch)
    assert float(out["position_loss"]) == pytest.approx(0.25 * 2 * math.log(g), rel=1e-5)
    assert torch.allclose(out["loss"], out["ce_loss"] + out["mask_bce_loss"] + out["mask_dice_loss"]
                          + out["attr_loss"] + out["position_loss"], rtol=1e-5)
    out["loss"].backward()
    assert probed.position_probe.weight.grad.abs().sum() > 0
    assert model.vlm.vision_tower.embeddings.position_embedding.weight.grad.abs().sum() > 0
    cfg = trainer.TrainConfig(out=str(tmp_path / "run"), model="lisa-tiny", dataset="shapes", steps=1,
                              token_position_weight=1.0, progress=False)
    with pytest.raises(trainer.InputError, match="--token-position-weight 1.0: the probes run only with"):
        trainer.train(cfg)
    assert not (tmp_path / "run").exists()
