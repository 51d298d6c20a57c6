"""groundseg's LISA against tensors produced by the official LISA code (../shared/parity/lisa_tiny).

The fixture's weights are laid out as a released checkpoint (official key names, no CLIP keys, CLIP in its own
folder) and loaded through the official-layout path; tolerances from parity/README.md: 1e-4 absolute for tensors
(float32), 1e-5 relative for losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groundseg import CheckpointError, load_model, save_pretrained
from groundseg.grounding.conversation import PromptTokenizer
from groundseg.grounding.lisa import LisaBatch

from conftest import LISA_TINY, write_official_lisa

ATOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> float:
    diff = (a.detach().float() - b.float()).abs().max().item()
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol}"
    return diff


def strip_pad(ids: torch.Tensor) -> list[int]:
    ids = ids.tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


def test_prompt_ids_match_transformers_431(parity_model, lisa_parity):
    cfg, inp, _, _ = lisa_parity
    tok = parity_model.prompt_tokenizer
    assert tok.mode == "lisa"
    for i, text in enumerate(cfg["infer"]["conversations"]):
        assert tok(text.replace("<image>", "<im_start><image><im_end>")) == strip_pad(inp["infer_input_ids"][i])
    for i, text in enumerate(cfg["train"]["conversations"]):
        assert tok(text) == strip_pad(inp["train_input_ids"][i])
    assert tok(cfg["eval"]["chat"]["prompt"]) == inp["eval_chat_input_ids"][0].tolist()
    assert tok(cfg["eval"]["forced"]["prompt"]) == inp["eval_forced_input_ids"][0].tolist()


def test_transformers5_alone_tokenises_differently(parity_model, lisa_parity):
    """Why the 'lisa' mode exists: the plain transformers-5 tokenizer puts a '▁' piece before <im_start> and
    drops characters the SentencePiece vocabulary lacks, so its ids differ from the training-time ids."""
    cfg, inp, _, _ = lisa_parity
    plain = PromptTokenizer(parity_model.tokenizer, "plain")
    ids = plain(cfg["eval"]["chat"]["prompt"])
    assert ids != inp["eval_chat_input_ids"][0].tolist()
    im_start = parity_model.tokenizer.convert_tokens_to_ids("<im_start>")
    before = parity_model.tokenizer.convert_ids_to_tokens(ids[ids.index(im_start) - 1])
    assert before == "\u2581"


def test_validation_path_intermediates(parity_model, lisa_parity):
    _, inp, out, _ = lisa_parity
    m = parity_model
    with torch.no_grad():
        feats = m.vlm.encode_images(inp["infer_images_clip"])
        close(feats[0], out["infer_projected_image_features"][0])
        emb = m.vlm.embed(inp["infer_input_ids"], feats.expand(2, -1, -1), m.pad_id)
        valid = out["infer_llm_attention_mask"]
        assert torch.equal(emb.attention_mask, valid)
        close(emb.inputs_embeds[valid], out["infer_llm_inputs_embeds"][valid])
        states, _ = m.vlm.run(emb.inputs_embeds, emb.attention_mask)
        close(states[valid], out["infer_last_hidden_state"][valid])
        close(m.vlm.logits(states)[valid], out["infer_logits"][valid])
        seg = torch.cat(m._seg_states(emb.token_ids, states))
        close(seg, out["infer_seg_hidden_states"])
        pred_emb = m.seg_projector(seg)
        close(pred_emb, out["infer_pred_embeddings"])
        sam_emb = m.sam.encode(inp["infer_images"])
        close(sam_emb, out["infer_sam_image_embeddings"])
        low_res, iou = m.sam.decode(sam_emb, pred_emb)
        close(low_res, out["infer_low_res_masks"])
        close(iou, out["infer_iou_predictions"])
        logits = m.sam.postprocess(low_res, tuple(inp["infer_resize_list"][0].tolist()),
                                   tuple(inp["infer_original_size_list"][0].tolist()))[:, 0]
        close(logits, out["infer_pred_masks"])
        assert torch.equal((logits > 0).to(torch.uint8), out["infer_pred_masks_binary"])


def test_teacher_forced_from_raw_pixels(parity_model, lisa_parity):
    """From the raw RGB image: our CLIP (PIL bicubic, centre crop) and SAM preprocessing, the batched forward
    over both expressions, and the masks at the original size."""
    _, inp, out, _ = lisa_parity
    rgb = inp["infer_image_rgb"].numpy()
    close(parity_model.clip_preprocess(rgb), inp["infer_images_clip"][0], 1e-5)
    sam_px, size = parity_model.sam.preprocess(rgb)
    close(sam_px, inp["infer_images"][0], 1e-5)
    assert size == tuple(inp["infer_resize_list"][0].tolist())
    # The fixture's ValDataset prompt has a space after the newline; 4.31 strips it, and so do we.
    logits = parity_model.segment_teacher_forced(rgb, ["the dog", "the left window"],
                                                 question=" What is {} in this image? Please output segmentation mask.")
    close(logits, out["infer_pred_masks"])


def test_training_losses(parity_model, lisa_parity):
    _, inp, out, _ = lisa_parity
    batch = LisaBatch(inp["train_input_ids"], inp["train_labels"], inp["train_images_clip"], inp["train_images"],
                      inp["train_offset"], [tuple(x) for x in inp["train_resize_list"].tolist()],
                      [tuple(x) for x in inp["train_original_size_list"].tolist()],
                      [inp["train_gt_masks_0"], inp["train_gt_masks_1"]])
    parity_model.train()
    try:
        res = parity_model(batch)
    finally:
        parity_model.eval()
    for name in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss"):
        ours, ref = res[name].item(), out[f"train_{name}"].item()
        assert abs(ours - ref) <= 1e-5 * abs(ref), f"{name}: {ours} vs official {ref}"
    close(res["pred_masks"][0], out["train_pred_masks_0"])
    close(res["pred_masks"][1], out["train_pred_masks_1"])
    res["loss"].backward()  # the graph reaches the trainable parts
    assert parity_model.seg_projector.text_hidden_fcs[0][0].weight.grad is not None
    parity_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["chat", "forced"])
def test_kv_cache_generation_matches_official_evaluate(parity_model, lisa_parity, name):
    """The official evaluate() recomputes the whole sequence every step (no cache); ours uses the KV cache and
    must produce the same ids, the same states and the same mask."""
    _, inp, out, _ = lisa_parity
    m = parity_model
    ids = inp[f"eval_{name}_input_ids"][0].tolist()
    with torch.no_grad():
        feats = m.vlm.encode_images(inp["infer_images_clip"])
        emb = m._embed_batch([ids], feats, left_pad=True)
        gen = m.vlm.generate(emb.inputs_embeds, emb.attention_mask, emb.token_ids, 3, m.eos_id, m.pad_id)
        assert ids + gen.new_tokens[0] == out[f"eval_{name}_output_ids"][0].tolist()
        seg = m._seg_states(gen.token_ids, gen.hidden_states)[0]
        if name == "chat":
            assert len(seg) == 0 and out["eval_chat_pred_masks"].shape[0] == 0
            return
        close(gen.hidden_states, out["eval_forced_last_step_hidden_state"])
        pred_emb = m.seg_projector(seg)
        close(pred_emb, out["eval_forced_pred_embeddings"])
        sam_emb = m.sam.encode(inp["infer_images"])
        low_res, _ = m.sam.decode(sam_emb, pred_emb)
        close(low_res, out["eval_forced_low_res_masks"])
        logits = m.sam.postprocess(low_res, (38, 64), (48, 80))[:, 0]
        close(logits, out["eval_forced_pred_masks"])


def test_safetensors_layout_and_our_format_round_trip(tmp_path, lisa_parity, parity_model):
    cfg, inp, out, state = lisa_parity
    ckpt, _ = write_official_lisa(tmp_path / "st", cfg, state, fmt="safetensors")
    m = load_model(ckpt)
    saved = save_pretrained(m, tmp_path / "ours")
    assert sorted(p.name for p in saved.iterdir())[:2] == ["config.json", "model.safetensors"]
    again = load_model(saved)
    rgb = inp["infer_image_rgb"].numpy()
    q = " What is {} in this image? Please output segmentation mask."
    a = again.segment_teacher_forced(rgb, ["the dog", "the left window"], question=q)
    close(a, out["infer_pred_masks"])
    assert again.prompt_tokenizer.mode == "lisa"
    assert again.prompt_tokenizer(cfg["eval"]["chat"]["prompt"]) == inp["eval_chat_input_ids"][0].tolist()


def test_strict_loading_names_the_tensors(tmp_path, lisa_parity):
    cfg, _, _, state = lisa_parity
    broken = dict(state)
    broken.pop("model.text_hidden_fcs.0.2.bias")
    broken["model.extra_head.weight"] = torch.zeros(2)
    ckpt, _ = write_official_lisa(tmp_path / "b", cfg, broken)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "seg_projector.text_hidden_fcs.0.2.bias" in msg and "extra_head" in msg and "\n" not in msg
