"""Boxes out through the mask decoder (``LisaConfig.box_from_mask``, what shapes-demo uses): generation hands the
``<box>`` state to SAM and writes that mask's box; training supervises that state with the box's object mask and
leaves the coordinates out of the CE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from groundseg.grounding.lisa import LisaModel, largest_component, prepare_image
from groundseg.grounding.tokens import BOX_END, BOX_START, IGNORE_INDEX, format_box, parse_boxes, token_id
from groundseg.io import masks_to_boxes_xyxy
from groundseg.train.data import Collator, ShapesSource, TrainSample


@pytest.fixture(scope="module")
def tiny():
    from groundseg import load_model

    return load_model("lisa-tiny")


@pytest.fixture(scope="module")
def boxy(tiny):
    """lisa-tiny's weights with box_from_mask switched on."""
    model = LisaModel(dataclasses.replace(tiny.config, box_from_mask=True), tiny.tokenizer)
    model.load_state_dict(tiny.state_dict())
    return model.eval()


def image(seed=0, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_largest_component_by_hand():
    m = np.zeros((10, 12), bool)
    m[0:2, 0:2] = True  # 4 px
    m[5:9, 6:10] = True  # 16 px
    m[9, 10] = True  # touches the big one diagonally: 8-connected, so part of it
    out = largest_component(m)
    assert out.sum() == 17 and out[9, 10] and not out[0, 0]
    assert not largest_component(np.zeros((3, 3), bool)).any()
    one = np.zeros((4, 4), bool)
    one[1, 1] = True
    assert (largest_component(torch.from_numpy(one)) == one).all()


def test_forced_tokens_continue_the_cached_generation_exactly(tiny):
    # The hook forces two tokens after the first chosen one; what follows must be what a full forward over the
    # whole sequence (no cache) would choose, so the forced tokens really entered the cache.
    vlm = tiny.vlm
    prep = prepare_image(image(), tiny.config)
    feats = vlm.encode_images(prep.clip[None])
    ids = tiny.prompt_tokenizer(tiny.chat_prompt("what is here?"))
    emb = tiny._embed_batch([ids], feats, left_pad=True)
    seen = []

    def hook(row, tok, state):
        seen.append((row, tok, state.shape))
        return [7, 9] if len(seen) == 1 else []

    gen = vlm.generate(emb.inputs_embeds, emb.attention_mask, emb.token_ids, 6, eos_token_id=-1, pad_id=0,
                       continue_with=hook)
    new = gen.new_tokens[0]
    assert len(new) == 6 and new[1:3] == [7, 9]
    assert seen[0][2] == (vlm.hidden_size,) and len(seen) == 4  # forced tokens are not shown to the hook
    full = tiny._embed_batch([ids + new[:3]], feats, left_pad=True)
    states, _ = vlm.run(full.inputs_embeds, full.attention_mask)
    assert int(vlm.logits(states[0, -1]).argmax()) == new[3]
    plain = vlm.generate(emb.inputs_embeds, emb.attention_mask, emb.token_ids, 1, eos_token_id=-1, pad_id=0)
    assert plain.new_tokens[0][0] == new[0]


@torch.no_grad()
def test_box_hook_writes_the_box_of_the_mask_the_state_prompts(boxy):
    img = image(1)
    prep = boxy.prepare_image(img)
    sam = boxy.sam.encode(prep.sam[None])
    made = [[]]
    hook = boxy._box_continuation([prep], sam, made)
    assert hook(0, boxy.seg_token_id, torch.zeros(boxy.vlm.hidden_size)) == [] and made == [[]]
    for seed in range(4):
        state = torch.randn(boxy.vlm.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
        text = boxy.tokenizer.decode(hook(0, boxy.box_token_id, state))
        # independently: the mask that state prompts, its largest part, its box on the 0-1000 grid
        low, _ = boxy.sam.decode(sam, boxy.seg_projector(state[None]))
        mask = boxy.sam.postprocess(low, prep.input_size, prep.original_size)[0, 0].numpy() > 0
        part = largest_component(mask)
        box = masks_to_boxes_xyxy(part[None])[0] if part.any() else [0, 0, 64, 48]
        assert text.replace(" ", "") == format_box(box, (48, 64))[len(BOX_START):]
        # the mask kept for the box: that largest part, with the mask decoder's own logits inside it
        kept = made[0][seed]
        assert torch.equal(kept > 0, torch.from_numpy(part))
        assert torch.equal(kept[torch.from_numpy(part)], torch.from_numpy(
            boxy.sam.postprocess(low, prep.input_size, prep.original_size)[0, 0].numpy()[part]))


def test_segment_answers_with_the_box_of_its_own_mask(boxy, monkeypatch):
    # Make the LLM say "<box>" first and EOS after: the coordinates must come from the hook, the reported mask
    # must be the largest part of the mask the <box> state prompts, and the text box must be that mask's box.
    box_id, eos = boxy.box_token_id, boxy.eos_id
    real = boxy.vlm.logits
    calls = []

    def logits(states):
        out = real(states)
        if states.dim() == 2:  # generation steps (the last state of each row)
            out = torch.full_like(out, -1e4)
            out[:, box_id if not calls else eos] = 1e4
            calls.append(1)
        return out

    monkeypatch.setattr(boxy.vlm, "logits", logits)
    (res,) = boxy.segment(image(2), "where is it?")
    assert res.text.startswith(BOX_START) and res.text.endswith(BOX_END) and res.sources == ["box"]
    (parsed,) = parse_boxes(res.text, (48, 64))
    mask = res.masks[0]
    assert mask.any()  # lisa-tiny's random <box> state gives several blobs here: one is kept
    assert (largest_component(mask) == mask).all()
    expect = masks_to_boxes_xyxy(mask[None])[0]
    assert np.abs(np.asarray(parsed.box) - expect).max() <= 64 / 1000 + 1e-6


def test_collator_supervises_box_states_and_skips_coordinates(tiny, boxy):
    src = ShapesSource(seed=3, image_size=64, tasks={"box": 1}, max_expressions=2)
    s = src.sample(np.random.default_rng(0))
    assert s.task == "box" and len(s.masks) == 0 and len(s.box_masks) == len(s.conversations) == 2
    for (_, answer), m in zip(s.conversations, s.box_masks):  # each box mask is the answer's box's object
        (b,) = parse_boxes(answer, m.shape)
        assert np.abs(np.asarray(b.box) - masks_to_boxes_xyxy(m[None])[0]).max() <= 64 / 1000 + 1e-6
    on, off = Collator(boxy.config, boxy.tokenizer)([s]), Collator(tiny.config, tiny.tokenizer)([s])
    assert on.gt_masks[0].shape[0] == 2 and off.gt_masks[0].shape[0] == 0
    assert torch.equal(on.gt_masks[0], torch.from_numpy(s.box_masks.astype(np.float32)))
    assert on.mask_attributes.tolist() == s.box_mask_attributes.tolist()
    end = token_id(tiny.tokenizer, BOX_END)
    for row in range(2):
        ids, lab_on, lab_off = on.input_ids[row], on.labels[row], off.labels[row]
        k0 = int((ids == boxy.box_token_id).nonzero()[0])
        k1 = int((ids == end).nonzero()[0])
        assert lab_on[k0] == boxy.box_token_id  # <box> itself is still predicted
        assert (lab_on[k0 + 1:k1 + 1] == IGNORE_INDEX).all()  # its coordinates and </box> are not
        assert (lab_off[k0 + 1:k1 + 1] == ids[k0 + 1:k1 + 1]).all()  # without box_from_mask they are
        assert lab_on[k1 + 1] == tiny.eos_id


def test_prompts_interleave_seg_and_box_masks_in_text_order(boxy):
    img = image(3)
    seg = np.zeros((2, 48, 64), bool)
    seg[0, :5], seg[1, 10:15] = True, True
    box = np.zeros((1, 48, 64), bool)
    box[0, 20:30, 5:9] = True
    s = TrainSample(img, [("a", "Sure, it [SEG] and <ref>x</ref><box>(1,2),(3,4)</box>"), ("b", "also [SEG].")],
                    seg, "mix", box_masks=box)
    batch = Collator(boxy.config, boxy.tokenizer)([s])
    assert torch.equal(batch.gt_masks[0], torch.from_numpy(np.stack([seg[0], box[0], seg[1]]).astype(np.float32)))
    with pytest.raises(ValueError, match="1 <box> in its answers but 2 box masks"):
        TrainSample(img, [("a", "<box>(1,2),(3,4)</box>")], seg[:0], "box", box_masks=np.concatenate([box, box]))


def test_forward_trains_the_box_state_through_the_mask_losses(boxy):
    src = ShapesSource(seed=4, image_size=64, tasks={"box": 1}, max_expressions=1)
    batch = Collator(boxy.config, boxy.tokenizer)([src.sample(np.random.default_rng(1))])
    boxy.train()
    try:
        boxy.zero_grad()
        out = boxy(batch)
        assert out["pred_masks"][0].shape == batch.gt_masks[0].shape == (1, 64, 64)
        assert out["mask_loss"] > 0
        out["loss"].backward()
        assert boxy.seg_projector.text_hidden_fcs[0][0].weight.grad.abs().sum() > 0
    finally:
        boxy.zero_grad()
        boxy.eval()
