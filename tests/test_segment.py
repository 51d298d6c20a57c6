"""End to end on the tiny preset: KV-cache generation -> [SEG] states -> SAM, checked against a full forward
without the cache; <box> answers; several prompts and images; unusual image modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from groundseg import InputError, load_model
from groundseg.grounding.conversation import image_question


def script(model, answer: str):
    """Make the LM answer ``answer`` (then EOS) whatever it sees: logits one-hot on the scripted ids."""
    ids = model.tokenizer(answer, add_special_tokens=False).input_ids + [model.eos_id]
    step = {"i": 0}
    vocab = model.config.llm["vocab_size"]

    def logits(states):
        out = torch.full((*states.shape[:-1], vocab), -1e4)
        out[..., ids[min(step["i"], len(ids) - 1)]] = 0.0
        step["i"] += 1
        return out

    model.vlm.logits = logits
    return ids


@pytest.fixture()
def tiny():
    return load_model("lisa-tiny")


def reference_masks(model, image, question: str, answer_ids: list[int]) -> torch.Tensor:
    """Independent path: one full forward (no cache) over prompt + answer; state before each [SEG]."""
    prep = model.prepare_image(image)
    ids = model.prompt_tokenizer(model.chat_prompt(question)) + answer_ids
    feats = model.vlm.encode_images(prep.clip[None])
    emb = model.vlm.embed(torch.tensor([ids]), feats, model.pad_id)
    states, _ = model.vlm.run(emb.inputs_embeds, emb.attention_mask)
    pos = (emb.token_ids[0] == model.seg_token_id).nonzero().flatten() - 1
    low, _ = model.sam.decode(model.sam.encode(prep.sam[None]), model.seg_projector(states[0, pos]))
    return model.sam.postprocess(low, prep.input_size, prep.original_size)[:, 0]


def test_two_seg_tokens_give_two_masks_equal_to_uncached_forward(tiny, media):
    ids = script(tiny, "Sure, [SEG] and [SEG].")
    with torch.no_grad():
        res = tiny.segment(media / "dog.jpg", "the dog and the bench")[0]
        ref = reference_masks(tiny, media / "dog.jpg", "the dog and the bench", ids[:-1])
    assert res.text == "Sure, [SEG] and [SEG]."
    assert res.masks.shape == (2, 534, 800) and res.masks.dtype == bool
    assert np.array_equal(res.masks, (ref > 0).numpy())
    assert res.sources == ["seg", "seg"]
    # scores: mean probability inside each mask, in (0.5, 1] when the mask is non-empty
    for m, s in zip(res.masks, res.scores):
        assert (0.5 < s <= 1.0) if m.any() else s == 0.0


def test_box_in_answer_becomes_a_sam_box_prompt(tiny, media):
    script(tiny, "<ref>the truck</ref><box>(100,200),(600,900)</box>")
    res = tiny.segment(media / "truck.jpg", "where is the truck?")[0]
    assert res.sources == ["box"] and res.phrases == ["the truck"]
    h, w = 1200, 1800
    box = torch.tensor([[100 * w / 1000, 200 * h / 1000, 600 * w / 1000, 900 * h / 1000]])
    prep = tiny.prepare_image(media / "truck.jpg")
    with torch.no_grad():
        low, _ = tiny.sam.decode(tiny.sam.encode(prep.sam[None]),
                                 boxes=tiny.sam.box_to_input_frame(box, prep.original_size))
        ref = tiny.sam.postprocess(low, prep.input_size, prep.original_size)[0, 0] > 0
    assert np.array_equal(res.masks[0], ref.numpy())


def test_no_seg_gives_empty_result(tiny, media):
    script(tiny, "I cannot see it.")
    res = tiny.segment(media / "dog.jpg", "a unicorn")[0]
    assert res.text == "I cannot see it." and res.masks.shape == (0, 534, 800) and len(res.boxes) == 0


def test_prompt_image_pairing_and_sizes(tiny, media):
    script(tiny, "[SEG].")
    out = tiny.segment([media / "dog.jpg", media / "truck.jpg"], "the vehicle")
    assert [r.masks.shape for r in out] == [(1, 534, 800), (1, 1200, 1800)]
    script(tiny, "[SEG].")
    out = tiny.segment(media / "groceries.jpg", ["the apples", "the bag", "the milk"])
    assert len(out) == 3 and all(r.masks.shape == (1, 534, 800) for r in out)
    with pytest.raises(InputError, match="2 images and 3 prompts"):
        tiny.segment([media / "dog.jpg", media / "truck.jpg"], ["a", "b", "c"])
    with pytest.raises(InputError, match="prompt is empty"):
        tiny.segment(media / "dog.jpg", "  ")
    with pytest.raises(InputError, match="no region encoder"):
        tiny.segment(media / "dog.jpg", "the dog", boxes=[(0, 0, 10, 10)])


def test_batched_generation_with_left_padding_equals_one_by_one(tiny, media):
    """Prompts of different lengths share one left-padded batch; each must equal its own unbatched run."""
    prompts = ["the dog", "the small brown dog on the left of the picture near the bench"]
    together = tiny.segment(media / "dog.jpg", prompts, max_new_tokens=6)
    alone = [tiny.segment(media / "dog.jpg", p, max_new_tokens=6)[0] for p in prompts]
    assert [r.text for r in together] == [r.text for r in alone]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_unusual_image_modes(tiny, tmp_path, mode):
    script(tiny, "[SEG].")
    arr = (np.arange(40 * 30) % 251).reshape(40, 30)
    img = Image.fromarray((arr * 257).astype(np.uint16)) if mode == "I;16" else Image.fromarray(
        arr.astype(np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    res = tiny.segment(path, "the thing")[0]
    assert res.masks.shape == (1, 40, 30)


def test_prompt_format_is_llava_v1(tiny):
    p = tiny.chat_prompt("the dog")
    assert p.endswith("USER: <im_start><image><im_end>\nthe dog ASSISTANT:")
    assert p.startswith("A chat between a curious human")
    assert image_question("x", False) == "<image>\nx"
