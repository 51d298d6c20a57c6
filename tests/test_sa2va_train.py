"""Sa2VA training on the shapes world's videos: the collator's batch trains (gradients reach what Sa2VA trains, the
frozen parts get none) and a few steps on one batch lower the loss."""

from __future__ import annotations

import numpy as np
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
