"""groundseg's GLaMM against tensors produced by the official GLaMM code (../shared/parity/glamm_tiny).

The fixture's weights are laid out as a released GLaMM checkpoint (config.json with GLaMMForCausalLM, official key
names without CLIP, CLIP in its own folder) and loaded through the official-layout path. Tolerance 1e-4 absolute
(parity/README.md), losses 1e-5 relative."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from groundseg import CheckpointError, load_model, save_pretrained
from groundseg.config import preset_config
from groundseg.grounding.glamm import GlammModel
from groundseg.grounding.lisa import LisaBatch
from groundseg.grounding.region import RegionCountError
from groundseg.hub import _GLAMM_RULES, _clip_prefix, build_model, official_to_ours

from conftest import SHARED, need, save_fixture_clip
from test_lisa_parity import strip_pad

GLAMM_TINY = SHARED / "parity" / "glamm_tiny"
ATOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> float:
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a.detach().float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol}"
    return diff


def write_official_glamm(folder: Path, cfg: dict, state: dict) -> Path:
    """The fixture as a released GLaMM checkpoint: config.json + weights without CLIP keys + tokenizer; CLIP in a
    folder of its own (as openai/clip-vit-large-patch14-336 would be)."""
    from safetensors.torch import save_file

    ckpt, clip_dir = folder / "glamm", folder / "clip"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({**cfg["llm_config"], "mm_vision_tower": str(clip_dir)}))
    save_file({k: v for k, v in state.items() if "vision_tower" not in k}, str(ckpt / "model.safetensors"))
    for f in (GLAMM_TINY / "tokenizer").iterdir():
        shutil.copy(f, ckpt / f.name)
    save_fixture_clip(cfg, state, clip_dir)
    return ckpt


@pytest.fixture(scope="module")
def glamm_parity():
    from safetensors.torch import load_file

    need(GLAMM_TINY)
    cfg = json.loads((GLAMM_TINY / "config.json").read_text())
    return (cfg, load_file(str(GLAMM_TINY / "inputs.safetensors")), load_file(str(GLAMM_TINY / "outputs.safetensors")),
            load_file(str(GLAMM_TINY / "state_dict.safetensors")))


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, glamm_parity) -> Path:
    cfg, _, _, state = glamm_parity
    return write_official_glamm(tmp_path_factory.mktemp("glamm"), cfg, state)


@pytest.fixture(scope="module")
def model(official_dir) -> GlammModel:
    m = load_model(official_dir)
    assert isinstance(m, GlammModel)
    return m


def image0(inp):
    return dict(clip=inp["infer_global_enc_images"], sam=inp["infer_grounding_enc_images"],
                input_size=tuple(inp["infer_resize_list"][0].tolist()),
                original_size=tuple(inp["infer_original_size_list"][0].tolist()))


def test_loaded_structure_and_token_ids(model, glamm_parity):
    cfg = glamm_parity[0]
    ids = cfg["vocab"]["special_token_ids"]
    assert model.bbox_token_id == ids["<bbox>"] == 114  # by name, not the loader's reset to 32002
    assert model.seg_token_id == ids["[SEG]"]
    assert model.region_levels == cfg["mm"]["region_level_hidden_state_indices"] == [1, 4, 7, 10]
    r = model.config.region
    assert (r.embed_dims, r.num_levels, r.num_fuse, r.roi_size, r.pos_hidden, r.query_dims, r.out_dims) == \
        (64, 4, 5, 14, 8, 16, 64)
    assert r.box_scale == 224.0 and r.map_sizes == cfg["region_encoder"]["upsampled_sizes"]


def test_prompt_ids_match_official(model, glamm_parity):
    cfg, inp, _, _ = glamm_parity
    tok = model.prompt_tokenizer
    for i, text in enumerate(cfg["infer"]["conversations"]):
        assert tok(text) == strip_pad(inp["infer_input_ids"][i])
    for i, text in enumerate(cfg["train"]["conversations"]):
        assert tok(text) == strip_pad(inp["train_input_ids"][i])
    assert tok(cfg["train_region"]["conversations"][0]) == strip_pad(inp["train_region_input_ids"][0])
    for name in ("region", "gcg_chat", "gcg_forced"):
        assert tok(cfg["eval"][name]["prompt"]) == inp[f"eval_{name}_input_ids"][0].tolist()
    # our own prompt builders give the same strings
    assert model.chat_prompt(model.config.gcg_prompt) == cfg["eval"]["gcg_chat"]["prompt"]


def test_referring_segmentation_intermediates(model, glamm_parity):
    _, inp, out, _ = glamm_parity
    m, im = model, image0(inp)
    with torch.no_grad():
        feats, levels = m._encode_clip(im["clip"])
        close(feats[0], out["eval_region_llm_inputs_embeds"][0, 128:704])
        close(torch.stack(levels), out["eval_region_mlvl_clip_features"])
        emb = m.vlm.embed(inp["infer_input_ids"], feats.expand(2, -1, -1), m.pad_id)
        valid = out["infer_llm_attention_mask"]
        assert torch.equal(emb.attention_mask, valid)
        emb = m._with_regions(emb, levels, [0, 0], None)  # no <bbox>: unchanged
        states, _ = m.vlm.run(emb.inputs_embeds, emb.attention_mask)
        close(states[valid], out["infer_last_hidden_state"][valid])
        seg = torch.cat(m._seg_states(emb.token_ids, states))
        close(seg, out["infer_seg_hidden_states"])
        pred = m.seg_projector(seg)
        close(pred, out["infer_pred_embeddings"])
        sam_emb = m.sam.encode(im["sam"])
        close(sam_emb, out["infer_sam_image_embeddings"])
        low_res, iou = m.sam.decode(sam_emb, pred)
        close(low_res, out["infer_low_res_masks"])
        close(iou, out["infer_iou_predictions"])
        logits = m.sam.postprocess(low_res, im["input_size"], im["original_size"])[:, 0]
        close(logits, out["infer_pred_masks"])


def test_referring_segmentation_from_raw_pixels(model, glamm_parity):
    """From the raw image through our preprocessing and segment(answer=...) (teacher-forced)."""
    _, inp, out, _ = glamm_parity
    rgb = inp["infer_image_rgb"].numpy()
    close(model.clip_preprocess(rgb), inp["infer_global_enc_images"][0], 1e-5)
    sam_px, size = model.sam.preprocess(rgb)
    close(sam_px, inp["infer_grounding_enc_images"][0], 1e-5)
    assert size == (38, 64)
    a = model.segment(rgb, "Can you segment the dog in this image?", answer="It is [SEG].")[0]
    b = model.segment(rgb, "What is left window in this image? Please output segmentation mask.", answer="[SEG].")[0]
    ref = out["infer_pred_masks_binary"].bool().numpy()
    assert (a.masks[0] == ref[0]).all() and (b.masks[0] == ref[1]).all()
    assert a.masks.shape == (1, 48, 80) and 0 < ref[0].sum() < ref[0].size


def test_region_path(model, glamm_parity):
    """Two <bbox> on image 0: CLIP levels, RoIs after the x224 scaling, per-level RoIAlign, region vectors,
    embeddings after replacement, logits and the 3 greedy tokens."""
    cfg, inp, out, _ = glamm_parity
    m, im = model, image0(inp)
    ids = inp["eval_region_input_ids"][0].tolist()
    boxes = inp["eval_region_bboxes"]
    with torch.no_grad():
        feats, levels = m._encode_clip(im["clip"])
        r = m.encode_regions(levels, [boxes])
        close(r.rois, out["eval_region_rois"], 1e-5)
        close(r.fused[3], out["eval_region_fuse_level3_out"])
        close(r.roi_feats, out["eval_region_roi_feats"])
        close(r.pos, out["eval_region_pos_embedd"])
        close(r.pooled, out["eval_region_flatten_linear_out"])
        close(r.features[0], out["eval_region_features"])
        emb = m._with_regions(m._embed_batch([ids], feats, left_pad=False), levels, [0], [boxes])
        pos = (emb.token_ids[0] == m.bbox_token_id).nonzero().flatten().tolist()
        assert pos == cfg["eval"]["region"]["bbox_positions_in_llm_sequence"] == [747, 753]
        close(emb.inputs_embeds, out["eval_region_llm_inputs_embeds"])
        states, _ = m.vlm.run(emb.inputs_embeds, emb.attention_mask)
        close(m.vlm.logits(states), out["eval_region_logits"])
        gen = m.vlm.generate(emb.inputs_embeds, emb.attention_mask, emb.token_ids, 3, m.eos_id, m.pad_id)
        assert ids + gen.new_tokens[0] == out["eval_region_output_ids"][0].tolist()


def test_region_path_through_segment(model, glamm_parity):
    """The public surface: pixel boxes on the raw image -> the same 3 tokens as the official evaluate()."""
    cfg, inp, out, _ = glamm_parity
    rgb = inp["infer_image_rgb"].numpy()
    h, w = rgb.shape[:2]
    px = [[x * w if k % 2 == 0 else x * h for k, x in enumerate(b)] for b in cfg["eval"]["region"]["bboxes"]]
    res = model.segment(rgb, "Can you please describe region1 <bbox> and region2 <bbox>?", boxes=px,
                        max_new_tokens=3)[0]
    expected = model.tokenizer.decode(out["eval_region_output_ids"][0, -3:].tolist(), skip_special_tokens=False)
    assert res.text == expected.strip() and len(res) == 0
    with pytest.raises(RegionCountError, match="2 <bbox> placeholder.*1 box"):
        model.segment(rgb, "Can you please describe region1 <bbox> and region2 <bbox>?", boxes=px[:1],
                      max_new_tokens=1)


def test_gcg_evaluate(model, glamm_parity):
    _, inp, out, _ = glamm_parity
    m, im = model, image0(inp)
    with torch.no_grad():
        feats, levels = m._encode_clip(im["clip"])
        for name in ("chat", "forced"):
            ids = inp[f"eval_gcg_{name}_input_ids"][0].tolist()
            emb = m._with_regions(m._embed_batch([ids], feats, left_pad=True), levels, [0], None)
            gen = m.vlm.generate(emb.inputs_embeds, emb.attention_mask, emb.token_ids, 3, m.eos_id, m.pad_id)
            assert ids + gen.new_tokens[0] == out[f"eval_gcg_{name}_output_ids"][0].tolist()
            seg = m._seg_states(gen.token_ids, gen.hidden_states)[0]
            if name == "chat":
                assert len(seg) == 0 and out["eval_gcg_chat_pred_masks"].shape[0] == 0
                continue
            pred = m.seg_projector(seg)
            close(pred, out["eval_gcg_forced_pred_embeddings"])
            sam_emb = m.sam.encode(im["sam"])
            low_res, _ = m.sam.decode(sam_emb, pred)
            close(low_res, out["eval_gcg_forced_low_res_masks"])
            logits = m.sam.postprocess(low_res, im["input_size"], im["original_size"])[:, 0]
            close(logits, out["eval_gcg_forced_pred_masks"])


def assert_gcg_forced(m: GlammModel, inp, out) -> None:
    """segment() with the fixture's GCG answer fixed: phrase k names mask k, masks as the official evaluate()."""
    res = m.segment(inp["infer_image_rgb"].numpy(), m.config.gcg_prompt,
                    answer="<p> A dog </p> [SEG] sits near <p> a window </p> [SEG]")[0]
    assert res.phrases == ["A dog", "a window"]
    assert (res.masks == (out["eval_gcg_forced_pred_masks"] > 0).numpy()).all()


def test_gcg_teacher_forced_pairs_phrases_with_masks(model, glamm_parity):
    _, inp, out, _ = glamm_parity
    assert_gcg_forced(model, inp, out)


def _train_batch(inp, region: bool = False) -> LisaBatch:
    if region:
        return LisaBatch(inp["train_region_input_ids"], inp["train_region_labels"], inp["infer_global_enc_images"],
                         None, inp["train_region_offset"], [], [], [], region_boxes=[inp["train_region_bboxes_0"]])
    return LisaBatch(inp["train_input_ids"], inp["train_labels"], inp["train_global_enc_images"],
                     inp["train_grounding_enc_images"], inp["train_offset"],
                     [tuple(x) for x in inp["train_resize_list"].tolist()],
                     [tuple(x) for x in inp["train_original_size_list"].tolist()],
                     [inp["train_gt_masks_0"], inp["train_gt_masks_1"]])


def test_training_losses(model, glamm_parity):
    _, inp, out, _ = glamm_parity
    model.train()
    try:
        res = model(_train_batch(inp))
        reg = model(_train_batch(inp, region=True))
    finally:
        model.eval()
    for name in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss"):
        ours, ref = res[name].item(), out[f"train_{name}"].item()
        assert abs(ours - ref) <= 1e-5 * abs(ref), f"{name}: {ours} vs official {ref}"
        ours, ref = reg[name].item(), out[f"train_region_{name}"].item()
        assert abs(ours - ref) <= 1e-5 * max(abs(ref), 1e-6), f"region {name}: {ours} vs official {ref}"
    close(res["pred_masks"][0], out["train_pred_masks_0"])
    close(res["pred_masks"][1], out["train_pred_masks_1"])
    close(res["seg_prompts"], out["train_pred_embeddings"])
    reg["loss"].backward()  # the CE reaches the region encoder through the replaced <bbox> rows
    g = model.region_encoder.roi_align.flatten_linear.weight.grad
    assert g is not None and g.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_our_format_round_trip(model, glamm_parity, tmp_path):
    _, inp, out, _ = glamm_parity
    again = load_model(save_pretrained(model, tmp_path / "ours"))
    assert isinstance(again, GlammModel) and again.config.region == model.config.region
    assert_gcg_forced(again, inp, out)


def test_strict_loading_names_the_tensors(tmp_path, glamm_parity):
    cfg, _, _, state = glamm_parity
    broken = dict(state)
    broken.pop("model.region_encoder.roi_align.updims.bias")
    ckpt = write_official_glamm(tmp_path, cfg, broken)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert "region_encoder.roi_align.updims.bias" in str(e.value) and "\n" not in str(e.value)


def test_glamm_preset_matches_released_keys():
    """The `glamm` preset built on the meta device has exactly GLaMM-FullScope's tensors (names and shapes)."""
    keys = need(SHARED / "parity" / "glamm_7b_keys.txt")
    ref = {}
    for line in keys.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        k, shape, _ = line.split("\t")
        ref[k] = tuple(json.loads(shape))
    m = build_model(preset_config("glamm"), None, device="meta")
    prefix = _clip_prefix(m)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith(prefix)}
    mapped = {official_to_ours(k, prefix, _GLAMM_RULES): s for k, s in ref.items()}
    mapped.pop(None, None)  # rotary inv_freq buffers: recomputed
    assert sorted(set(mapped) - set(ours)) == [] and sorted(set(ours) - set(mapped)) == []
    assert {k: (ours[k], s) for k, s in mapped.items() if ours[k] != s} == {}
    n_region = sum(v.numel() for k, v in m.state_dict().items() if k.startswith("region_encoder."))
    assert n_region == 299_142_912  # reference/glamm.md §2.2
    assert m.region_levels == [14, 17, 20, 23]
