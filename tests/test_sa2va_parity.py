"""groundseg's Sa2VA against tensors produced by the official Sa2VA HF-release code (../shared/parity/sa2va_tiny).

The fixture's weights are laid out as a released checkpoint (config.json = the Sa2VAChatConfig, model.safetensors
with the release key names, tokenizer files) and loaded through the official-layout path; only the SAM2 size (every
release is Hiera-L) is passed in. Tolerance: 1e-4 absolute for float32 tensors, 1e-5 relative for losses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED, need

SA2VA_TINY = SHARED / "parity" / "sa2va_tiny"
ATOL = 1e-4
ANSWER = "Sure, [SEG].<|im_end|>"


def close(a, b, atol: float = ATOL) -> float:
    diff = (torch.as_tensor(a).detach().float() - torch.as_tensor(b).float()).abs().max().item()
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol}"
    return diff


def rel(a, b, tol: float = 1e-5) -> None:
    a, b = float(a), float(b)
    assert abs(a - b) <= tol * abs(b), f"{a} vs {b}"


@pytest.fixture(scope="module")
def fixture():
    from safetensors.torch import load_file

    need(SA2VA_TINY)
    cfg = json.loads((SA2VA_TINY / "config.json").read_text())
    return cfg, load_file(str(SA2VA_TINY / "inputs.safetensors")), load_file(str(SA2VA_TINY / "outputs.safetensors"))


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, fixture):
    cfg = fixture[0]
    d = tmp_path_factory.mktemp("sa2va_release")
    (d / "config.json").write_text(json.dumps(cfg["model_config"]))
    shutil.copy(SA2VA_TINY / "state_dict.safetensors", d / "model.safetensors")
    for f in (SA2VA_TINY / "tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def model(release_dir):
    from groundseg.config import Sam2Config, sam2_tiny_overrides
    from groundseg.grounding.sa2va_hub import load_official_sa2va

    return load_official_sa2va(release_dir, sam2=Sam2Config("configs/sam2/sam2_hiera_t.yaml",
                                                            sam2_tiny_overrides()))


def test_release_keys_load_with_only_the_fuser_rename(model):
    from safetensors.torch import load_file

    from groundseg.grounding.sa2va_hub import ours_to_official

    official = load_file(str(SA2VA_TINY / "state_dict.safetensors"))
    ours = model.state_dict()
    assert {ours_to_official(k) for k in ours} == set(official)
    renamed = [k for k in ours if ours_to_official(k) != k]
    assert sorted(renamed) == [f"grounding_encoder.sam2_model.memory_encoder.fuser.layers.{i}.gamma" for i in (0, 1)]
    for k, v in ours.items():
        assert torch.equal(v, official[ours_to_official(k)]), k


def test_image_path(model, fixture):
    cfg, inp, out = fixture
    rgb = inp["image_rgb"].numpy()
    from groundseg.grounding.sa2va import image_tiles

    assert np.array_equal(np.stack(image_tiles(rgb)), inp["image_tiles_rgb"].numpy())
    with torch.no_grad():
        tokens = model.encode_tiles(model.image_pixel_values(rgb))
        close(tokens, out["image_vit_embeds"])
        ids = model.encode_text(model.prompt_text(cfg["image"]["text"], 3))
        assert ids == inp["image_input_ids"][0].tolist()
        assert model.encode_text(ANSWER) == inp["forced_answer_ids"].tolist()
        g = model.ground(tokens.flatten(0, 1), cfg["image"]["text"], 3, answer=ANSWER)
        close(g.seg_hidden_states, out["image_seg_hidden_states"])
        close(g.seg_embeddings, out["image_seg_embeddings"])
        # the SAM2 side, intermediate by intermediate
        sam = model.grounding_encoder
        px = sam.preprocess(rgb)[None]
        close(px[:, :, ::16, ::16], inp["image_g_pixel_values_stride16"])
        close(px.double().sum((2, 3)), inp["image_g_pixel_values_sum"], atol=0.5)
        feats = sam.encode(px)
        for i in range(3):
            close(feats.backbone_fpn[i], out[f"image_sam_backbone_fpn_{i}"])
        head = sam.decode(feats, language=g.seg_embeddings)
        close(head.sparse_embeddings, out["image_sam_sparse_embeddings"])
        close(head.multimasks, out["image_sam_low_res_multimasks"])
        close(head.ious, out["image_sam_ious"])
        assert head.best_index.tolist() == out["image_sam_best_mask_index"].tolist()
        close(head.obj_ptr, out["image_sam_obj_ptr"])
        close(head.object_score_logits, out["image_sam_object_score_logits"])
        # the whole public path
        res = model.segment(rgb, "the red square", answer=ANSWER)[0]
    assert res.masks.shape == (1, 40, 80)
    assert np.array_equal(res.masks[0], out["image_mask_bool"][0].numpy())
    assert res.masks[0].any() and not res.masks[0].all()


def test_free_generation_stops_on_either_stop_word(model, fixture):
    cfg, _, out = fixture
    with torch.no_grad():
        tokens = model.encode_tiles(model.image_pixel_values(fixture[1]["image_rgb"].numpy())).flatten(0, 1)
        g = model.ground(tokens, cfg["image"]["text"], 3, max_new_tokens=8)
    assert g.answer_ids == out["image_free_output_ids"].tolist()
    assert len(g.seg_embeddings) == 0  # no [SEG]: no mask, as in the release


def test_video_path(model, fixture):
    cfg, inp, out = fixture
    frames = list(inp["video_frames_rgb"].numpy())
    with torch.no_grad():
        px = model.frame_pixel_values(frames[:5])
        close(px[:, :, ::8, ::8], inp["video_pixel_values_stride8"])
        ids = model.encode_text(model.prompt_text(cfg["video"]["text"], 5, video=True))
        assert ids == inp["video_input_ids"][0].tolist()
        groundings = []
        tracked = list(model.track(frames, ["the moving square"], answer=ANSWER, groundings=groundings))
    assert [f.index for f in tracked] == list(range(8))
    assert [f.key_frame for f in tracked] == [True] * 5 + [False] * 3
    close(groundings[0].seg_hidden_states, out["video_seg_hidden_states"])
    close(groundings[0].seg_embeddings, out["video_seg_embeddings"])
    logits = torch.stack([f.logits[0] for f in tracked])
    close(logits, out["video_mask_logits"])
    assert np.array_equal(np.stack([f.masks[0] for f in tracked]), out["video_mask_bool"].numpy())
    scores = torch.stack([f.object_scores[0] for f in tracked])
    close(scores, out["video_sam_object_score_logits"][:, 0])
    # object scores turn negative on the tracked frames, yet their masks are kept (no NO_OBJ_SCORE blanking)
    assert (scores[5:] < 0).all() and np.stack([f.masks[0] for f in tracked])[5:].any()


def test_video_memory_intermediates(model, fixture):
    _, inp, out = fixture
    frames = list(inp["video_frames_rgb"].numpy())
    sam = model.grounding_encoder
    emb = out["video_seg_embeddings"]
    memory = sam.new_memory(1)
    captured = {}
    with torch.no_grad():
        conds = [sam.add_condition(memory, t, sam.encode(sam.preprocess(frames[t])[None]), emb) for t in range(5)]
        tracked = [sam.track(memory, t, sam.encode(sam.preprocess(frames[t])[None]),
                             capture=captured if t == 5 else None) for t in range(5, 8)]
        mem7 = memory.non_cond[6]["maskmem_features"]
    for t in range(5):
        close(memory.cond[t]["maskmem_features"], out["video_sam_maskmem_features"][t])
        close(memory.cond[t]["obj_ptr"], out["video_sam_obj_ptr"][t:t + 1])
    close(captured["pix_feat_with_mem"], out["video_sam_memory_conditioned_features_f5"])
    close(mem7, out["video_sam_maskmem_features"][6])
    outs = conds + tracked
    close(torch.cat([o.low_res_masks for o in outs]), out["video_sam_low_res_masks"])
    close(torch.cat([o.ious for o in outs]), out["video_sam_ious"])


def _train_batch(model, fixture):
    """The fixture's training batch built by our collator from the same turns, frames and masks."""
    from groundseg.grounding.sa2va import Sa2VASample

    cfg, inp, _ = fixture
    rgb, frames = inp["image_rgb"].numpy(), list(inp["video_frames_rgb"].numpy()[:5])
    samples = [Sa2VASample([rgb], [tuple(t) for t in cfg["train"]["image_turns"]],
                           inp["train_gt_masks_image"][None].numpy()),
               Sa2VASample(frames, [tuple(t) for t in cfg["train"]["video_turns"]],
                           inp["train_gt_masks_video"][:, None].numpy(), video=True)]
    return model.collate(samples)


def test_collate_reproduces_the_official_training_batch(model, fixture):
    _, inp, _ = fixture
    batch = _train_batch(model, fixture)
    assert torch.equal(batch.input_ids, inp["train_input_ids"])
    assert torch.equal(batch.labels, inp["train_labels"])
    assert torch.equal(batch.attention_mask, inp["train_attention_mask"])
    close(batch.sam_pixel_values[:, :, ::16, ::16], inp["train_g_pixel_values_stride16"])
    assert batch.pixel_values.shape == (8, 3, 448, 448)  # 3 image tiles + 5 key frames
    assert [tuple(g.shape) for g in batch.gt_masks] == [(1, 2, 40, 80), (5, 1, 48, 64)]


def test_training_losses(model, fixture):
    _, inp, out = fixture
    batch = _train_batch(model, fixture)
    with torch.no_grad():
        res = model(batch, point_generator=torch.Generator().manual_seed(4321))
    rel(res["ce_loss"], out["train_ce_loss"])
    close(res["seg_hidden_states"], out["train_seg_hidden_states"])
    close(res["seg_embeddings"], out["train_pred_embeddings"])
    close(res["language_embeddings"], out["train_language_embeddings"])
    close(res["ious"], out["train_ious"])
    close(res["low_res_masks"][[0, 1, 5], 0], out["train_low_res_masks_subset"])
    # the same set of points (topk may order equal-uncertainty points differently), the random share in order
    for r in range(2):
        ours, theirs = res["points"][r], out["train_sampled_points_first2"][r]
        assert set(map(tuple, ours.tolist())) == set(map(tuple, theirs.tolist()))
        close(ours[9408:], theirs[9408:], atol=0)
    rel(res["mask_bce_loss"], out["train_loss_mask"])
    rel(res["mask_dice_loss"], out["train_loss_dice"])
    rel(res["loss"], out["train_loss"])


def test_training_losses_without_point_sampling(model, fixture):
    _, inp, out = fixture
    batch = _train_batch(model, fixture)
    old = model.config.losses.num_points
    model.config.losses.num_points = 0
    try:
        with torch.no_grad():
            res = model(batch)
    finally:
        model.config.losses.num_points = old
    rel(res["mask_bce_loss"], out["train_loss_mask_nosample"])
    rel(res["mask_dice_loss"], out["train_loss_dice_nosample"])


def test_sa2va_4b_layout_on_meta_device():
    """The sa2va-4b preset, built on the meta device, has exactly the released Sa2VA-4B tensors (names and
    shapes) once our two fuser names are spelled the release's way."""
    from groundseg.config import SA2VA_PRESETS
    from groundseg.grounding.sa2va_hub import build_sa2va, official_layout

    path = need(SHARED / "parity" / "sa2va_4b_keys.txt")
    expected = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        expected[key] = tuple(json.loads(shape))
    model = build_sa2va(SA2VA_PRESETS["sa2va-4b"](), None, device="meta")
    ours = official_layout(model)
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert len(ours) == 1685
    assert sum(int(np.prod(s)) for s in ours.values()) == 3941809714


def test_convert_to_our_format_and_back(model, tmp_path):
    """`groundseg convert` of the release layout: our folder (config.json with family sa2va, model.safetensors,
    tokenizer) reloads through load_model to the same tensors and config."""
    from groundseg import load_model, save_pretrained

    folder = save_pretrained(model, tmp_path / "ours")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["family"] == "sa2va" and raw["sam2"]["config_file"] == "configs/sam2/sam2_hiera_t.yaml"
    again = load_model(folder)
    assert type(again) is type(model) and again.config.template == "qwen_chat" and again.config.out_dim == 32
    ours, theirs = model.state_dict(), again.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.tokenizer.convert_tokens_to_ids("[SEG]") == 332
