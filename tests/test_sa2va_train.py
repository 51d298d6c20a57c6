"""Sa2VA training on the shapes world's videos: the collator's batch trains (gradients reach what Sa2VA trains, the
frozen parts get none) and a few steps on one batch lower the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groundseg.grounding.sa2va import Sa2VASample


def _video_sample(world, index: int, frames=(0, 3)) -> Sa2VASample:
    v = world.video(index)
    e = v.expressions[0]
    obj = e.targets[0]
    gt = np.stack([v.masks[obj][t] for t in frames])[:, None]  # (T, 1, H, W)
    return Sa2VASample([v.frames[t] for t in frames], [(f"<image>\nPlease segment {e.text}.", "Sure, [SEG].")],
                       gt, video=True)


def test_a_few_steps_on_shapes_videos_lower_the_loss():
    from groundseg.datasets.shapes import ShapesWorld
    from groundseg.hub import load_model

    torch.manual_seed(0)
    model = load_model("sa2va-tiny")
    model.config.losses.num_points = 0  # full maps: a deterministic loss to compare across steps
    sam = model.grounding_encoder.sam2_model
    # what Sa2VA trains: the LLM (LoRA in the release), mlp1, text_hidden_fcs and SAM2's mask decoder
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [model.language_model, model.mlp1, model.text_hidden_fcs, sam.sam_mask_decoder]
    for m in trained:
        m.requires_grad_(True)
    world = ShapesWorld(seed=11, image_size=64)
    batch = model.collate([_video_sample(world, 0)])
    opt = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=2e-3)
    model.train()
    losses = []
    for step in range(6):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            # the three multimask heads (head 0 is the single-mask output, unused with multimask_output)
            heads = sam.sam_mask_decoder.output_hypernetworks_mlps
            assert sum(float(h.layers[0].weight.grad.abs().sum()) for h in heads[1:]) > 0
            assert heads[0].layers[0].weight.grad is None or float(heads[0].layers[0].weight.grad.abs().sum()) == 0
            assert model.text_hidden_fcs[0].weight.grad.abs().sum() > 0
            assert sam.image_encoder.trunk.patch_embed.proj.weight.grad is None  # frozen, not even computed
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"ce_loss", "mask_bce_loss", "mask_dice_loss"} <= set(out)


def _memory_model():
    from groundseg.hub import load_model

    torch.manual_seed(0)
    model = load_model("sa2va-tiny")
    model.config.losses.track_memory = True
    model.config.key_frames, model.config.num_key_frames = "first", 1
    return model


def test_memory_training_losses_match_an_independent_computation_and_reach_the_memory():
    # track_memory: key frame prompted, the other frames tracked through SAM2's memory; every frame supervised.
    # The losses are recomputed here from the returned frame outputs, and the gradient reaches the memory
    # attention and the memory encoder (which only the tracked frames use).
    import torch.nn.functional as F

    from groundseg.datasets.shapes import ShapesWorld

    model = _memory_model()
    world = ShapesWorld(seed=11, image_size=64)
    a, b = _video_sample(world, 0, frames=(0, 1, 2)), _video_sample(world, 1, frames=(0, 1, 2))
    image = Sa2VASample([world.image(0).image], [("<image>\nPlease segment it.", "Sure, [SEG].")],
                        world.image(0).objects[0].mask[None, None], video=False)
    batch = model.collate([a, image, b])
    model.train()
    out = model(batch)
    lc = model.config.losses
    groups = out["tracked"]
    assert [len(outs) for outs, _ in groups] == [1, 3]  # the image alone, then the two 3-frame videos together
    bce = dice = iou = obj = 0.0
    n = 0
    for outs, gt in groups:
        for t, fo in outs.items():
            assert fo.conditioning == (t == 0)
            pred = fo.multimasks.float().detach()
            target = gt[t].expand_as(pred)
            bce += float(F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean((-2, -1)).mean(1).sum())
            p = pred.sigmoid().flatten(2)
            d = 1 - (2 * (p * target.flatten(2)).sum(-1) + lc.dice_eps) / (p.sum(-1) + target.flatten(2).sum(-1)
                                                                         + lc.dice_eps)
            dice += float(d.mean(1).sum())
            hard, ref = pred > 0, target > 0
            inter, union = (hard & ref).sum((-2, -1)).float(), (hard | ref).sum((-2, -1)).float()
            real = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            iou += float(((fo.ious.float().detach() - real) ** 2).mean(1).sum())
            vis = ref[:, 0].flatten(1).any(1).float()
            obj += float(F.binary_cross_entropy_with_logits(fo.object_score_logits.float().detach()[:, 0], vis,
                                                            reduction="sum"))
            n += len(pred)
    assert n == 1 + 2 * 3
    assert float(out["mask_bce_loss"]) == pytest.approx(bce / n * lc.bce_weight, rel=1e-4)
    assert float(out["mask_dice_loss"]) == pytest.approx(dice / n * lc.dice_weight, rel=1e-4)
    assert float(out["iou_loss"]) == pytest.approx(iou / n * lc.iou_weight, rel=1e-4)
    assert float(out["object_loss"]) == pytest.approx(obj / n * lc.object_weight, rel=1e-4)
    out["loss"].backward()
    sam = model.grounding_encoder.sam2_model
    assert sum(float(p.grad.abs().sum()) for p in sam.memory_attention.parameters() if p.grad is not None) > 0
    assert sum(float(p.grad.abs().sum()) for p in sam.memory_encoder.parameters() if p.grad is not None) > 0


def test_memory_training_rows_read_their_own_videos():
    # Two videos tracked together give each row the masks it would get alone (rows never mix frames).
    from groundseg.datasets.shapes import ShapesWorld

    model = _memory_model().eval()  # no dropout: equal inputs give equal outputs
    world = ShapesWorld(seed=11, image_size=64)
    a, b = _video_sample(world, 0, frames=(0, 1, 2)), _video_sample(world, 1, frames=(0, 1, 2))
    together = model(model.collate([a, b]))["tracked"][0][0]
    alone = model(model.collate([b]))["tracked"][0][0]
    for t in range(3):
        torch.testing.assert_close(together[t].multimasks[1:], alone[t].multimasks, atol=1e-4, rtol=1e-4)


def test_shapes_video_samples_and_the_picklable_collator():
    import pickle

    from groundseg.grounding.sa2va import Sa2VACollator
    from groundseg.train.data import ShapesSource, video_answer

    src = ShapesSource(seed=3, image_size=64, tasks={"video": 1}, video_frames=5, max_expressions=1)
    s = src.sample(np.random.default_rng(0))
    assert s.task == "video" and len(s.frames) == 5 and s.masks.shape == (1, 5, 64, 64)
    assert s.image is s.frames[0]
    q, a = s.conversations[0]
    assert q.startswith("<image>\nPlease segment ") and a.startswith("Sure, the ") and a.endswith(" [SEG].")
    assert a == video_answer(a[len("Sure, "):-len(" [SEG].")])
    model = _memory_model()
    collator = pickle.loads(pickle.dumps(model.collator()))  # DataLoader workers get a copy
    assert isinstance(collator, Sa2VACollator)
    batch = collator([s])
    assert batch.gt_masks[0].shape == (5, 1, 64, 64)
    assert torch.equal(batch.gt_masks[0][:, 0], torch.from_numpy(s.masks[0]))
    assert batch.sam_pixel_values.shape[0] == 5
    ref = model.collate([Sa2VASample(s.frames, s.conversations, s.masks.transpose(1, 0, 2, 3), video=True)])
    assert torch.equal(batch.input_ids, ref.input_ids) and torch.equal(batch.pixel_values, ref.pixel_values)
    # a LISA collator refuses video samples with a clear message
    from groundseg.io import InputError
    from groundseg.hub import load_model
    from groundseg.train.data import Collator

    lisa = load_model("lisa-tiny")
    with pytest.raises(InputError, match="need a video model"):
        Collator(lisa.config, lisa.tokenizer)([s])


def test_memory_training_shows_the_mllm_only_the_key_frames():
    # With track_memory the MLLM sees what track() shows it at inference (the key frames), SAM2 every frame;
    # without it (Sa2VA's own training) every frame is a conditioning frame and the MLLM sees them all.
    from groundseg.datasets.shapes import ShapesWorld
    model = _memory_model()
    model.config.key_frames, model.config.num_key_frames = "uniform", 3
    world = ShapesWorld(seed=11, image_size=64)
    s = _video_sample(world, 0, frames=tuple(range(7)))
    context = model.img_context_id
    batch = model.collate([s])
    assert torch.equal(batch.pixel_values, model.frame_pixel_values([s.frames[k] for k in (0, 3, 6)]))
    assert int((batch.input_ids == context).sum()) == 3 * model.tokens_per_tile
    assert batch.sam_pixel_values.shape[0] == 7 and batch.gt_masks[0].shape[0] == 7
    model.config.losses.track_memory = False
    batch = model.collate([s])
    assert batch.pixel_values.shape[0] == 7 and int((batch.input_ids == context).sum()) == 7 * model.tokens_per_tile


def test_video_keys_samples_are_the_uniform_key_frames_of_the_clip():
    from groundseg.train.data import ShapesSource

    full = ShapesSource(seed=3, image_size=64, tasks={"video": 1}, video_frames=16).sample(np.random.default_rng(5))
    keys = ShapesSource(seed=3, image_size=64, tasks={"video_keys": 1}, video_frames=16).sample(
        np.random.default_rng(5))
    n = len(full.conversations)
    assert keys.task == "video" and keys.conversations == full.conversations
    assert len(keys.frames) == 5 and keys.masks.shape == (n, 5, 64, 64)
    for k, t in enumerate((0, 4, 8, 11, 15)):  # round(linspace(0, 15, 5))
        assert np.array_equal(keys.frames[k], full.frames[t]) and np.array_equal(keys.masks[:, k], full.masks[:, t])
        assert np.array_equal(keys.frame_attribute_maps[k], full.frame_attribute_maps[t])


def test_video_answers_echo_attribute_expressions_and_name_moving_targets():
    # "the small star" is answered "Sure, the small star [SEG]." (the LLM copies it); "the star moving up" with
    # the target's shortest unique name, which only watching the frames tells.
    from groundseg.datasets.shapes import ShapesWorld
    from groundseg.train.data import ShapesSource, video_answer

    # Up to max_expressions turns per clip, about different objects; only the first question holds <image>.
    src = ShapesSource(seed=3, image_size=64, tasks={"video": 1}, video_frames=16, max_expressions=3)
    world = ShapesWorld(seed=3, image_size=64)
    rng = np.random.default_rng(1)
    kinds, turns = set(), []
    for _ in range(12):
        state = rng.bit_generator.state
        s = src.sample(rng)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        replay.choice(1, p=[1.0])  # the task draw
        v = world.video(int(replay.integers(src.num_images)), 16)
        names = src._names_for(v)
        targets = []
        for k, (q, a) in enumerate(s.conversations):
            prefix = "<image>\nPlease segment " if k == 0 else "Please segment "
            assert q.startswith(prefix) and q.count("<image>") == (k == 0)
            text = q[len(prefix):-1]
            e = next(x for x in v.expressions if x.text == text)
            assert a == video_answer(text if e.kind == "attribute" else names[e.targets[0]])
            assert np.array_equal(s.masks[k], v.masks[e.targets[0]])
            targets.append(e.targets[0])
            kinds.add(e.kind)
        assert len(set(targets)) == len(targets) <= 3
        assert s.mask_attributes.shape == (len(targets), 3)
        turns.append(len(targets))
    assert kinds == {"attribute", "motion"} and max(turns) > 1


def test_groundseg_train_runs_sa2va_on_shapes_videos_and_exports(tmp_path):
    # The trainer with a Sa2VA preset: video samples through the Sa2VA collator, memory training, LoRA merged
    # (on the language model), export in our format, and the exported model loads and tracks.
    from groundseg.hub import load_model
    from groundseg.train.trainer import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "run"), model="sa2va-tiny", from_scratch=True, dataset="shapes",
                      shapes_tasks={"video": 3, "refer": 1}, shapes_max_expressions=2, shapes_video_frames=3,
                      shapes_image_size=64, steps=2, batch_size=2, lr=1e-3, warmup_steps=1, attribute_weight=0.5,
                      token_attribute_weight=0.5, vision_pretrain_steps=3, vision_pretrain_batch=4,
                      vision_pretrain_images=8, num_workers=1, lora=True, trainable=["text_hidden_fcs", "sam_mask_decoder"], save_every=2, progress=False)
    threads = torch.get_num_threads()
    out = train(cfg)
    assert torch.get_num_threads() == threads  # a loader worker (from a fork server) ran; the cores came back
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]  # logged every 10 steps and at the last
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["attr_loss"] > 0 and rows[0]["data_wait_s"] >= 0  # the probes ran; the loader wait is logged
    pretrained = json.loads((out / "vision_pretrain.json").read_text())  # SAM2's encoder was pretrained first
    assert pretrained["steps"] == 3 and set(pretrained["object_accuracy"]) == {"colour", "shape", "size"}
    model = load_model(out / "final")
    assert model.family == "sa2va" and not any("lora_" in k or "probe" in k for k in model.state_dict())
    world_frames = [np.zeros((48, 64, 3), np.uint8) + 40 * k for k in range(3)]
    frames = list(model.track(world_frames, ["the red circle"], answer="Sure, [SEG]."))
    assert len(frames) == 3 and frames[0].logits.shape == (1, 48, 64)


def test_frame_grid_labels_take_each_cells_centre_pixel():
    from groundseg.train.data import frame_grid_labels

    amap = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)  # (C, H, W)
    out = frame_grid_labels(amap, 2)
    # cells of 2 rows x 3 columns; centres at rows 1, 3 and columns 1, 4 (int((k + 0.5) * 6 / 2) = 1, 4)
    assert out.dtype == np.int64 and out.shape == (2, 2, 2)
    assert out[0].tolist() == [[amap[0, 1, 1], amap[0, 1, 4]], [amap[0, 3, 1], amap[0, 3, 4]]]
    assert np.array_equal(frame_grid_labels(amap[None], 2)[0], out)  # leading dimensions pass through


def test_video_samples_carry_each_frames_attribute_labels():
    from groundseg.datasets.shapes import COLORS, SHAPES, SIZES
    from groundseg.train.data import ShapesSource

    src = ShapesSource(seed=3, image_size=64, tasks={"video": 1}, video_frames=5, max_expressions=1)
    s = src.sample(np.random.default_rng(0))
    amaps = s.frame_attribute_maps
    assert amaps.shape == (5, 3, 64, 64) and amaps.dtype == np.uint8
    target = s.masks[0]  # (T, H, W) of the [SEG]'s object
    cls = s.mask_attributes[0]
    assert s.mask_attributes.shape == (1, 3)
    assert 1 <= cls[0] <= len(COLORS) and 1 <= cls[1] <= len(SHAPES) and 1 <= cls[2] <= len(SIZES)
    for k in range(3):
        assert (amaps[:, k][target] == cls[k]).all()  # the target's pixels carry its classes in every frame
    assert (amaps[:, 0] > 0).sum() >= target.sum()  # other objects are labelled too; background is 0
    assert np.array_equal(s.attribute_map, amaps[0])


def _probe_batch(model):
    from groundseg.train.data import ShapesSource

    src = ShapesSource(seed=1, image_size=64, tasks={"video": 1, "refer": 1}, video_frames=3, max_expressions=2)
    rng = np.random.default_rng(2)
    samples = [src.sample(rng) for _ in range(3)]
    return samples, model.collator()(samples)


def test_sa2va_attribute_labels_follow_the_frames_sam2_and_the_mllm_see():
    from groundseg.train.data import frame_grid_labels

    model = _memory_model()
    model.config.num_key_frames = 2  # first 2 frames of each 3-frame clip go to the MLLM
    samples, batch = _probe_batch(model)
    grid = model.collator().sam_image_size // 4
    tgrid = int(round(model.collator().tokens_per_tile ** 0.5))
    frames, tiles, attrs = [], [], []
    for s in samples:
        maps = s.frame_attribute_maps if s.frames is not None else s.attribute_map[None]
        frames.append(frame_grid_labels(maps, grid))
        tiles.append(frame_grid_labels(maps[:2] if s.frames is not None else maps, tgrid))
        attrs.append(s.mask_attributes)
    assert batch.frame_attributes.shape == (batch.sam_pixel_values.shape[0], 3, grid, grid)
    assert torch.equal(batch.frame_attributes.long(), torch.from_numpy(np.concatenate(frames)))
    assert batch.tile_attributes.shape[0] == batch.pixel_values.shape[0]
    assert torch.equal(batch.tile_attributes.long(), torch.from_numpy(np.concatenate(tiles)))
    assert torch.equal(batch.mask_attributes, torch.from_numpy(np.concatenate(attrs)))
    # samples without labels (real data): the batch has none
    from groundseg.grounding.sa2va import Sa2VASample

    plain = Sa2VASample(samples[0].frames, samples[0].conversations, samples[0].masks.transpose(1, 0, 2, 3), True)
    assert model.collate([plain]).frame_attributes is None


def test_sa2va_attribute_probes_add_the_cross_entropies_they_claim():
    import torch.nn.functional as F

    from groundseg.train.probes import Sa2VAProbedModel

    torch.manual_seed(0)
    model = _memory_model()
    probed = Sa2VAProbedModel(model, weight=0.5, token_weight=2.0)
    _, batch = _probe_batch(model)
    out = probed(batch)
    base = out["loss"] - out["attr_loss"]
    assert torch.allclose(base, out["ce_loss"] + out["mask_bce_loss"] + out["mask_dice_loss"] + out["iou_loss"]
                          + out["object_loss"], atol=1e-5)

    def heads(logits, labels):  # (N, K, ...) logits, (N, 3, ...) labels: summed CE of the three heads
        parts = logits.split(probed.probes.classes, dim=1)
        return sum(F.cross_entropy(p, labels[:, k]) for k, p in enumerate(parts))

    feats = out["sam_embeddings"]  # every frame of the batch, in the order of sam_frames
    assert sorted(out["sam_frames"].tolist()) == list(range(batch.sam_pixel_values.shape[0]))
    labels = batch.frame_attributes[out["sam_frames"]].long()
    g = labels.shape[-1]
    image = heads(F.interpolate(probed.probes.image(feats), size=(g, g), mode="bilinear", align_corners=False),
                  labels)
    prompt = heads(probed.probes.prompt(out["seg_embeddings"]), batch.mask_attributes)
    tokens = F.layer_norm(out["image_tokens"], out["image_tokens"].shape[-1:])
    token = heads(probed.token_probe(tokens).transpose(1, 2), batch.tile_attributes.long().flatten(2))
    assert torch.allclose(out["attr_loss"], 0.5 * (image + prompt) + 2.0 * token, rtol=1e-5)
    out["loss"].backward()
    assert probed.probes.image.weight.grad.abs().sum() > 0 and probed.token_probe.weight.grad.abs().sum() > 0
    # the probes reach SAM2's image encoder and the vision tower through their inputs
    enc = next(p for p in model.grounding_encoder.sam2_model.image_encoder.parameters())
    assert enc.grad is not None and enc.grad.abs().sum() > 0


def test_sa2va_position_probe_reads_each_tile_tokens_row_and_column():
    import math

    from groundseg.train.probes import Sa2VAProbedModel

    torch.manual_seed(0)
    model = _memory_model()
    probed = Sa2VAProbedModel(model, weight=0.5, token_weight=0.0, position_weight=2.0)
    g = math.isqrt(model.tokens_per_tile)
    assert g * g == model.tokens_per_tile and probed.position_probe.out_features == 2 * g
    torch.nn.init.zeros_(probed.position_probe.weight)
    torch.nn.init.zeros_(probed.position_probe.bias)
    _, batch = _probe_batch(model)
    out = probed(batch)
    assert float(out["position_loss"]) == pytest.approx(2.0 * 2 * math.log(g), rel=1e-5)
    assert torch.allclose(out["loss"], out["ce_loss"] + out["mask_bce_loss"] + out["mask_dice_loss"]
                          + out["iou_loss"] + out["object_loss"] + out["attr_loss"] + out["position_loss"],
                          rtol=1e-5)
