"""The SAM2 decoder on the ``sam2`` package: prompts against SAM2's own heads, the language token, and a memory
bank that stays bounded however long the video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groundseg.config import Sam2Config, sam2_tiny_overrides
from groundseg.decoders.sam2 import Sam2Decoder


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    d = Sam2Decoder(Sam2Config("configs/sam2/sam2_hiera_t.yaml", sam2_tiny_overrides() + ["++model.image_size=256"]))
    with torch.no_grad():  # strong mask/score heads so that both signs of the object score occur
        dec = d.sam2_model.sam_mask_decoder
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(25)
        dec.pred_obj_score_head.layers[-1].weight.mul_(25)
    return d.eval()


def _frame(seed: int, size=(48, 64)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)


def test_points_and_boxes_match_sam2_own_heads(decoder):
    """Without a language prompt our heads are SAM2's ``_forward_sam_heads`` minus the object-score blanking:
    identical logits where the object score is positive, SAM2's -1024 fill where it is not."""
    m = decoder.sam2_model
    with torch.no_grad():
        feats = decoder.encode(decoder.preprocess(_frame(1))[None])
        pts = torch.tensor([[[10.0, 20.0]], [[30.0, 5.0]], [[50.0, 40.0]]])  # original-image pixels (x, y)
        labels = torch.ones(3, 1, dtype=torch.int32)
        ours = decoder.decode(feats, points=(pts, labels), original_size=(48, 64))
        f = feats.repeat(3)
        coords = pts * torch.tensor([256 / 64, 256 / 48])
        theirs = m._forward_sam_heads(backbone_features=decoder._unconditioned(f),
                                      point_inputs={"point_coords": coords, "point_labels": labels},
                                      high_res_features=f.high_res, multimask_output=True)
        box = torch.tensor([[8.0, 6.0, 40.0, 30.0]])
        ours_box = decoder.decode(feats, boxes=box, original_size=(48, 64))
        corners = box.view(1, 2, 2) * torch.tensor([256 / 64, 256 / 48])
        theirs_box = m._forward_sam_heads(
            backbone_features=decoder._unconditioned(feats),
            point_inputs={"point_coords": corners, "point_labels": torch.tensor([[2, 3]], dtype=torch.int32)},
            high_res_features=feats.high_res, multimask_output=False)
    present = (ours.object_score_logits[:, 0] > 0)
    assert present.any() or (~present).any()
    for i in range(3):
        if present[i]:
            assert torch.allclose(ours.multimasks[i], theirs[0][i], atol=1e-5)
        else:
            assert bool((theirs[0][i] == -1024).all()) and not bool((ours.multimasks[i] == -1024).all())
    assert torch.allclose(ours.ious, theirs[2], atol=1e-6)
    assert torch.allclose(ours.obj_ptr, theirs[5], atol=1e-6)
    best = theirs[2].argmax(-1)
    assert torch.equal(ours.best_index, best)
    assert ours_box.multimasks.shape[1] == 1  # two box corners: single-mask output, as SAM2 decides
    if ours_box.object_score_logits[0, 0] > 0:
        assert torch.allclose(ours_box.low_res_masks, theirs_box[3], atol=1e-5)


def test_language_is_a_third_sparse_token(decoder):
    m = decoder.sam2_model
    lang = torch.randn(2, 32)
    with torch.no_grad():
        out = decoder.decode(decoder.encode(decoder.preprocess(_frame(2))[None]), language=lang)
    assert out.sparse_embeddings.shape == (2, 3, 32)
    not_a_point = m.sam_prompt_encoder.not_a_point_embed.weight[0]
    assert torch.allclose(out.sparse_embeddings[:, :2], not_a_point.expand(2, 2, 32))
    assert torch.equal(out.sparse_embeddings[:, 2], lang)
    assert out.multimasks.shape == (2, 3, 64, 64)  # best of 3 on a 256 input (64x64 low-res)
    rows = torch.arange(2)
    assert torch.equal(out.low_res_masks[:, 0], out.multimasks[rows, out.ious.argmax(-1)])
    assert not torch.allclose(out.multimasks[0], out.multimasks[1])  # each prompt its own mask


def test_objects_tracked_together_equal_objects_tracked_alone(decoder):
    with torch.no_grad():
        feats = [decoder.encode(decoder.preprocess(_frame(10 + t))[None]) for t in range(5)]
    lang = torch.randn(2, 32)

    def run(language):
        mem = decoder.new_memory(len(language))
        with torch.no_grad():
            for t in range(2):
                decoder.add_condition(mem, t, feats[t], language)
            return torch.cat([decoder.track(mem, t, feats[t]).low_res_masks for t in range(5)], 1)

    both = run(lang)
    assert torch.allclose(both[0], run(lang[:1])[0], atol=1e-4)
    assert torch.allclose(both[1], run(lang[1:])[0], atol=1e-4)


def test_memory_stays_bounded_on_a_long_video(decoder):
    mem = decoder.new_memory(1)
    m = decoder.sam2_model
    assert mem.keep == max(m.num_maskmem - 1, m.max_obj_ptrs_in_encoder - 1) == 15
    with torch.no_grad():
        feats = decoder.encode(decoder.preprocess(_frame(3))[None])
        decoder.add_condition(mem, 0, feats, torch.randn(1, 32))
        sizes = []
        for t in range(1, 21):  # the same features every frame: only the bank's bookkeeping matters here
            decoder.track(mem, t, feats)
            sizes.append(len(mem.non_cond))
    assert sizes[:15] == list(range(1, 16)) and sizes[15:] == [15] * 5
    assert sorted(mem.non_cond) == list(range(6, 21))
    assert list(mem.cond) == [0]
    # what SAM2 reads for frame 21: 6 previous memories and 15 previous pointers, all still in the bank
    needed = set(range(21 - 6, 21)) | set(range(21 - 15, 21))
    assert needed <= set(mem.non_cond)


def test_cpu_encode_in_chunks_equals_one_call(decoder, monkeypatch):
    """5 frames in chunks of 2 (2 + 2 + 1) give the features of one call over all 5, per field and level."""
    x = torch.stack([decoder.preprocess(_frame(40 + t)) for t in range(5)])
    with torch.no_grad():
        monkeypatch.setattr(decoder, "cpu_encode_chunk", 0)
        whole = decoder.encode(x)
        monkeypatch.setattr(decoder, "cpu_encode_chunk", 2)
        parts = decoder.encode(x)
    assert parts.feat_sizes == whole.feat_sizes and parts.batch == 5
    for a, b in zip(parts.vision_feats + parts.vision_pos + parts.backbone_fpn,
                    whole.vision_feats + whole.vision_pos + whole.backbone_fpn):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # frame 4 (the odd chunk) is frame 4, not a copy of another
    assert not torch.allclose(parts.backbone_fpn[-1][4], parts.backbone_fpn[-1][3])


def test_memory_is_encoded_only_when_a_later_frame_reads_it(decoder, monkeypatch):
    """Key frames alone never run the memory encoder; tracking a frame encodes every entry it reads, once; the
    last frame's own memory stays unencoded until asked for, and then equals an eager encoding."""
    calls = []
    real = decoder._encode_memory
    monkeypatch.setattr(decoder, "_encode_memory", lambda *a, **k: calls.append(1) or real(*a, **k))
    mem = decoder.new_memory(1)
    with torch.no_grad():
        feats = [decoder.encode(decoder.preprocess(_frame(30 + t))[None]) for t in range(5)]
        prompt = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
        outs = [decoder.add_condition(mem, t, feats[t], prompt) for t in range(3)]
        assert calls == []
        decoder.track(mem, 3, feats[3])
        assert len(calls) == 3  # the three key frames, read by frame 3's memory attention
        decoder.track(mem, 4, feats[4])
        assert len(calls) == 4  # frame 3's memory; frame 4's is not read yet
        last = mem.non_cond[4]["maskmem_features"]
        assert len(calls) == 5 and mem.non_cond[4]["maskmem_features"] is last  # encoded once
        eager, _ = real(feats[0], outs[0].low_res_masks, outs[0].object_score_logits, from_points=True)
    assert torch.equal(mem.cond[0]["maskmem_features"], eager)
    with pytest.raises(KeyError):
        mem.cond[0]["no_such_key"]


def test_pruning_the_bank_changes_no_output(decoder):
    """26 tracked frames of changing content: the bounded bank gives the same masks, scores and object pointers
    as a bank that keeps everything, so what it drops is never read."""
    from groundseg.decoders.sam2 import VideoMemory

    pruned = decoder.new_memory(1)
    full = VideoMemory(1, keep=10_000)
    with torch.no_grad():
        frames = [decoder.encode(decoder.preprocess(_frame(10 + k))[None]) for k in range(4)]
        prompt = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
        for mem in (pruned, full):
            decoder.add_condition(mem, 0, frames[0], prompt)
        for t in range(1, 27):
            a, b = decoder.track(pruned, t, frames[t % 4]), decoder.track(full, t, frames[t % 4])
            assert torch.equal(a.low_res_masks, b.low_res_masks), t
            assert torch.equal(a.object_score_logits, b.object_score_logits), t
    assert len(full.non_cond) == 26 and len(pruned.non_cond) == pruned.keep == 15
    for t in pruned.non_cond:  # what both kept is the same
        assert torch.equal(pruned.non_cond[t]["obj_ptr"], full.non_cond[t]["obj_ptr"])


def test_postprocess_two_step_resize(decoder):
    low = torch.zeros(1, 1, 64, 64)
    low[..., 16:48, 8:24] = 5.0
    full = decoder.postprocess(low, (48, 64))
    assert full.shape == (1, 1, 48, 64)
    mask = full[0, 0] > 0
    cols = mask.any(0).nonzero().flatten()
    rows = mask.any(1).nonzero().flatten()
    # x 8..24 of 64 -> 8..24 of 64 columns; y 16..48 of 64 -> 12..36 of 48 rows (boundaries within a pixel)
    assert abs(int(cols[0]) - 8) <= 1 and abs(int(cols[-1]) - 23) <= 1
    assert abs(int(rows[0]) - 12) <= 1 and abs(int(rows[-1]) - 35) <= 1
