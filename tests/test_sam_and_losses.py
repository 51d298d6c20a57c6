"""SAM decoder against segment-anything's own predictor, bf16 casting, and the losses against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from groundseg.config import LossConfig, sam_config
from groundseg.decoders.sam import SamDecoder
from groundseg.io import load_image
from groundseg.train.losses import dice_loss, mask_losses, sigmoid_bce, token_ce


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return SamDecoder(sam_config("tiny")).eval()


def test_box_prompt_matches_segment_anything_predictor(sam, media):
    """Our preprocess -> encode -> decode(boxes) -> postprocess equals segment-anything's SamPredictor on a real
    photo (an implementation we did not write)."""
    from segment_anything import SamPredictor

    rgb = load_image(media / "dog.jpg")
    box = np.array([120.0, 60.0, 600.0, 500.0])
    pred = SamPredictor(sam.sam)
    pred.set_image(rgb)
    ref, _, _ = pred.predict(box=box, multimask_output=False, return_logits=True)
    with torch.no_grad():
        px, size = sam.preprocess(rgb)
        emb = sam.encode(px[None])
        low, _ = sam.decode(emb, boxes=sam.box_to_input_frame(torch.tensor(box)[None], rgb.shape[:2]))
        ours = sam.postprocess(low, size, rgb.shape[:2])[0, 0]
    assert ours.shape == rgb.shape[:2]
    assert (ours - torch.from_numpy(ref[0])).abs().max().item() < 1e-4


def test_text_and_box_prompts_in_one_call_equal_separate_calls(sam):
    torch.manual_seed(1)
    emb = torch.randn(1, 32, 4, 4)
    text = torch.randn(3, 32)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 40.0]])
    with torch.no_grad():
        both, _ = sam.decode(emb, text, boxes)
        t_only, _ = sam.decode(emb, text)
        b_only, _ = sam.decode(emb, boxes=boxes)
    assert both.shape == (4, 1, 16, 16)
    assert torch.allclose(both[:3], t_only) and torch.allclose(both[3:], b_only)
    # Every text prompt's mask is independent of the others in the batch.
    with torch.no_grad():
        single, _ = sam.decode(emb, text[1:2])
    assert torch.allclose(single, t_only[1:2], atol=1e-6)


def test_bf16_keeps_prompt_encoder_float32(sam):
    m = SamDecoder(sam_config("tiny"))
    m.load_state_dict(sam.state_dict())
    m.to(torch.bfloat16)
    assert m.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert m.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        low, _ = m.decode(m.encode(px), torch.randn(2, 32), torch.tensor([[1.0, 2.0, 40.0, 50.0]]))
    assert low.dtype == torch.bfloat16 and low.shape == (3, 1, 16, 16)
    assert torch.isfinite(low.float()).all()


def test_postprocess_crops_padding_and_resizes(sam):
    low = torch.zeros(1, 1, 16, 16)
    low[..., :8, :] = 5.0  # top half of the padded square is foreground
    out = sam.postprocess(low, (32, 64), (48, 96))  # resized image fills the top half of the 64x64 input
    assert out.shape == (1, 1, 48, 96)
    assert (out > 0).float().mean().item() > 0.95  # the crop removed the empty padding


def test_bce_and_dice_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.sigmoid(logits)
    bce = -(gt * p.log() + (1 - gt) * (1 - p).log()).mean()
    assert torch.allclose(sigmoid_bce(logits, gt), bce[None], atol=1e-6)
    # Dice with LISA's 1000 scale: num = 2*sum(p*t)/1000, den = (sum p + sum t)/1000.
    sp = float(p.sum()); spt = float((p * gt).sum())
    expect = 1 - (2 * spt / 1000 + 1e-6) / ((sp + 2) / 1000 + 1e-6)
    assert math.isclose(dice_loss(logits, gt).item(), expect, rel_tol=1e-6)
    assert math.isclose(dice_loss(torch.full((1, 2, 2), -50.0), torch.zeros(1, 2, 2)).item(), 0.0, abs_tol=1e-6)


def test_mask_losses_weight_by_mask_count():
    cfg = LossConfig()
    a = torch.randn(2, 3, 3); ga = (torch.rand(2, 3, 3) > 0.5).float()
    b = torch.randn(1, 4, 5); gb = (torch.rand(1, 4, 5) > 0.5).float()
    bce, dice = mask_losses([a, b, torch.zeros(0, 2, 2)], [ga, gb, torch.zeros(0, 2, 2)], cfg)
    all_bce = torch.cat([sigmoid_bce(a, ga), sigmoid_bce(b, gb)])
    all_dice = torch.cat([dice_loss(a, ga), dice_loss(b, gb)])
    assert torch.allclose(bce, 2.0 * all_bce.mean(), atol=1e-6)
    assert torch.allclose(dice, 0.5 * all_dice.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        mask_losses([a], [gb], cfg)


def test_token_ce_ignores_masked_positions():
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, -100, 3, 5]])  # only positions 1 -> 3 and 2 -> 5 are supervised
    expect = (torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 5])))
    assert torch.allclose(token_ce(logits, labels), expect)


def test_point_prompts_match_segment_anything_predictor(sam, media):
    from segment_anything import SamPredictor

    rgb = load_image(media / "truck.jpg")
    pts, labels = np.array([[500.0, 400.0], [900.0, 700.0]]), np.array([1, 0])
    pred = SamPredictor(sam.sam)
    pred.set_image(rgb)
    ref, _, _ = pred.predict(point_coords=pts, point_labels=labels, multimask_output=False, return_logits=True)
    with torch.no_grad():
        px, size = sam.preprocess(rgb)
        coords = sam.points_to_input_frame(torch.tensor(pts)[None], rgb.shape[:2])
        low, _ = sam.decode(sam.encode(px[None]), points=(coords, torch.tensor(labels)[None]))
        ours = sam.postprocess(low, size, rgb.shape[:2])[0, 0]
    assert (ours - torch.from_numpy(ref[0])).abs().max().item() < 1e-4


def test_projectors():
    from groundseg.grounding.vlm import build_projector

    lin, mlp = build_projector("linear", 8, 16), build_projector("mlp2x_gelu", 8, 16)
    assert sorted(lin.state_dict()) == ["bias", "weight"]
    assert sorted(mlp.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # LLaVA-1.5's names
    x = torch.randn(3, 8)
    assert torch.allclose(mlp(x), mlp[2](torch.nn.functional.gelu(mlp[0](x))))
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("qformer", 8, 16)
