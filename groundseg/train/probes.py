"""Auxiliary attribute probes: a training-only loss that teaches a from-scratch model what the shapes world's
words mean, densely.

A model trained from random weights learns *where objects are* within a few hundred steps, but which object a
phrase names only slowly: the mask losses say "not this one" per query, never "this pixel is a circle". Two
linear probes give that signal directly (LISA needs none of this: its SAM and LLM come pretrained):

* on SAM's image embedding, a 1x1 convolution predicts each pixel's colour, shape and size class (background
  included) on SAM's low-resolution mask grid;
* on each projected ``[SEG]`` prompt, a linear layer predicts the colour, shape and size of the object its mask
  covers, so the LLM state before ``[SEG]`` must carry the whole name, not just its last word.

Cross-entropy on each of the six heads, summed and weighted by ``--attribute-weight``. The probes are not part
of the model: the export drops them, and a model trained with them loads and runs like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..grounding.tokens import IGNORE_INDEX


class AttributeProbes(nn.Module):
    """Linear colour/shape/size classifiers on SAM image embeddings and on projected ``[SEG]`` prompts."""

    def __init__(self, embed_dim: int, prompt_dim: int, classes: tuple[int, ...]):
        super().__init__()
        self.classes = tuple(classes)
        self.image = nn.Conv2d(embed_dim, sum(self.classes), 1)
        self.prompt = nn.Linear(prompt_dim, sum(self.classes))

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, sum(classes), ...) logits, (N, len(classes), ...) labels -> summed CE over the heads."""
        total = logits.new_zeros(())
        for k, part in enumerate(logits.split(self.classes, dim=1)):
            lab = labels[:, k]
            if (lab != IGNORE_INDEX).any():
                total = total + F.cross_entropy(part.float(), lab, ignore_index=IGNORE_INDEX)
        return total

    def losses(self, sam_embeddings: torch.Tensor, seg_prompts: torch.Tensor, attribute_maps: torch.Tensor,
               mask_attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image probe CE, prompt probe CE). ``attribute_maps`` (B, 3, g, g) on SAM's low-res grid."""
        g = attribute_maps.shape[-1]
        logits = F.interpolate(self.image(sam_embeddings.to(self.image.weight.dtype)), size=(g, g),
                               mode="bilinear", align_corners=False)
        image = self._ce(logits, attribute_maps.to(logits.device))
        prompt = logits.new_zeros(())
        if len(seg_prompts) and len(seg_prompts) == len(mask_attributes):
            prompt = self._ce(self.prompt(seg_prompts.to(self.prompt.weight.dtype)), mask_attributes.to(logits.device))
        return image, prompt


class _Probed(nn.Module):
    """What both probed wrappers share: ``.model`` (what gets exported) and its config/tokenizer, and the token
    probe's loss."""

    model: nn.Module

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _token_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, t, H) image tokens, (N, 3, t) class labels -> the token probe's summed CE. The tokens are
        layer-normalised first: their scale is the LLM's business, not the probe's."""
        tokens = F.layer_norm(tokens.to(self.token_probe.weight.dtype), tokens.shape[-1:])
        return self.probes._ce(self.token_probe(tokens).transpose(1, 2), labels.to(tokens.device))

    def _make_position_probe(self, hidden: int, grid: int, weight: float) -> None:
        self.position_weight = float(weight)
        if self.position_weight:
            self.position_grid = int(grid)
            self.position_probe = nn.Linear(hidden, 2 * self.position_grid)

    def _position_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, g * g, H) row-major image tokens -> the position probe's CE: each token's row and column (two g-way
        linear heads on the layer-normalised token), weighted by ``position_weight``.

        A vision tower trained from random weights on what-is-where labels keeps little of *where*: in a trained
        glamm-shapes the column of a token was linearly readable 18% of the time on an 8x8 grid (chance 12.5%),
        and a caption "from left to right" (the order the shapes world used then) has nothing to go by. (A
        pretrained CLIP's tokens carry their position; LLaVA relies on it.) With this probe they read back at
        99.7%; that alone did not teach the small LLM to list objects in order (README, "GCG and region
        captions")."""
        from .vision_pretrain import position_loss  # the vision pretraining stage's head computes the same loss

        tokens = F.layer_norm(tokens.to(self.position_probe.weight.dtype), tokens.shape[-1:])
        return self.position_weight * position_loss(self.position_probe(tokens), self.position_grid)


def name_token_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the shapes world's object names, indexed by the probes' 1-based classes (0 = background):
    ``short[colour, shape]`` is " red circle", ``full[size, colour, shape]`` " large red circle"; -1 where a
    class is background. Each name must be one token of ``tokenizer`` (shapes-demo's spells every name so)."""
    from ..datasets.shapes import COLORS, SHAPES, SIZES

    def one(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"--name-weight needs one-token object names, but this tokenizer spells {text!r} "
                             f"as {len(ids)} tokens (shapes-demo's tokenizer has one per name)")
        return ids[0]

    short = torch.full((len(COLORS) + 1, len(SHAPES) + 1), -1, dtype=torch.long)
    full = torch.full((len(SIZES) + 1, len(COLORS) + 1, len(SHAPES) + 1), -1, dtype=torch.long)
    for c, colour in enumerate(COLORS, 1):
        for k, shape in enumerate(SHAPES, 1):
            short[c, k] = one(f" {colour} {shape}")
            for z, size in enumerate(SIZES, 1):
                full[z, c, k] = one(f" {size} {colour} {shape}")
    return short, full


def name_alignment_loss(vectors: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between ``vectors`` (..., H) and the rows ``ids`` (...) of ``embeddings`` (V, H),
    over the entries whose id is >= 0, divided by the mean squared norm of those target rows (so 1 means "as
    far as zero is"); 0 when no id is set."""
    keep = ids >= 0
    if not bool(keep.any()):
        return vectors.new_zeros((), dtype=torch.float32)
    target = embeddings[ids[keep]].float()
    return (vectors[keep].float() - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp_min(1e-12)


def name_direction_loss(vectors: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(vector, embeddings[id])`` over the entries of ``ids`` (...) that are >= 0; 0 when none."""
    keep = ids >= 0
    if not bool(keep.any()):
        return vectors.new_zeros((), dtype=torch.float32)
    return (1 - F.cosine_similarity(vectors[keep].float(), embeddings[ids[keep]].float(), dim=-1)).mean()


class ProbedModel(_Probed):
    """A LISA-family model plus :class:`AttributeProbes`; ``forward`` adds ``attr_loss`` (weighted) to the loss
    when the batch carries attribute labels. ``.model`` is what gets exported.

    ``token_weight`` > 0 adds a third probe, on the image tokens the LLM reads (the projected vision-tower patches):
    each patch's colour, shape and size class. Generating a description of the image (grounded captions, region
    captions) needs those tokens to say what is where; naming what the question names does not, so without this
    a from-scratch vision tower learns little about shapes.

    ``region_weight`` > 0 (GLaMM models) adds the same classifiers on each region vector, the vector that replaces a
    ``<bbox>``: the colour, shape and size of the box's object (``LisaBatch.region_attributes``), so the region
    encoder must carry what a region caption names, whatever the LLM has learnt to say so far.

    ``name_weight`` > 0 (a tokenizer that spells every object name as one token, as shapes-demo's does) pulls each
    region vector to the LLM's own input embedding of its object's full name (:func:`name_alignment_loss`): the
    region of a large red circle should read, to the LLM, like the word " large red circle", a region caption's
    answer. No new head: the target is the (detached) word embedding, so what the LLM has learnt about copying a
    name from the question into the answer applies to regions as they are. ``token_name_weight`` > 0 does the same
    for each image token on an object (its colour-and-shape name, " red circle"), by direction only
    (:func:`name_direction_loss`): image tokens are far larger than word embeddings, and pulling their length
    down as well erased what the vision tower had learnt about shape."""

    def __init__(self, model: nn.Module, weight: float, token_weight: float = 0.0, region_weight: float = 0.0,
                 position_weight: float = 0.0, name_weight: float = 0.0, token_name_weight: float = 0.0):
        super().__init__()
        from ..datasets.shapes import COLORS, SHAPES, SIZES

        self.model = model
        self.weight = float(weight)
        self.token_weight = float(token_weight)
        dim = model.config.sam.prompt_embed_dim
        classes = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
        self.probes = AttributeProbes(dim, model.config.out_dim, classes)
        if self.token_weight:
            self.token_probe = nn.Linear(model.vlm.language_model.config.hidden_size, sum(classes))
        self.region_weight = float(region_weight)
        if self.region_weight:
            if not hasattr(model, "encode_regions"):
                raise ValueError("the region probe needs a model with a region encoder (GLaMM)")
            self.region_probe = nn.Linear(model.config.region.out_dims, sum(classes))
        vision = model.config.vision.clip
        self._make_position_probe(model.vlm.language_model.config.hidden_size,
                                  vision["image_size"] // vision["patch_size"], position_weight)
        self.name_weight, self.token_name_weight = float(name_weight), float(token_name_weight)
        if self.name_weight or self.token_name_weight:
            short, full = name_token_tables(model.tokenizer)
            self.register_buffer("short_names", short, persistent=False)
            self.register_buffer("full_names", full, persistent=False)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        if self.position_weight:  # needs no labels: any batch with images
            out["position_loss"] = self._position_loss(out["image_tokens"])
            out["loss"] = out["loss"] + out["position_loss"]
        if batch.attribute_maps is None:
            out["attr_loss"] = out["loss"].new_zeros(())
            return out
        image, prompt = self.probes.losses(out["sam_embeddings"], out["seg_prompts"], batch.attribute_maps,
                                           batch.mask_attributes)
        out["attr_loss"] = self.weight * (image + prompt)
        if self.token_weight and batch.token_attribute_maps is not None:
            # (B, g * g, H) row-major patches, (B, 3, g * g) labels
            out["attr_loss"] = out["attr_loss"] + self.token_weight * self._token_loss(
                out["image_tokens"], batch.token_attribute_maps.flatten(2))
        if self.name_weight and batch.region_attributes is not None and out.get("region_vectors") is not None:
            emb = self.model.vlm.language_model.get_input_embeddings().weight.detach()
            a = batch.region_attributes.to(emb.device)
            out["name_loss"] = self.name_weight * name_alignment_loss(
                out["region_vectors"], self.full_names[a[:, 2], a[:, 0], a[:, 1]], emb)
            out["attr_loss"] = out["attr_loss"] + out["name_loss"]
        if self.token_name_weight and batch.token_attribute_maps is not None:
            emb = self.model.vlm.language_model.get_input_embeddings().weight.detach()
            labels = batch.token_attribute_maps.flatten(2).to(emb.device)  # (B, 3, t)
            ids = self.short_names[labels[:, 0], labels[:, 1]]  # (B, t); -1 off objects
            out["token_name_loss"] = self.token_name_weight * name_direction_loss(out["image_tokens"], ids, emb)
            out["attr_loss"] = out["attr_loss"] + out["token_name_loss"]
        if self.region_weight and batch.region_attributes is not None and out.get("region_vectors") is not None:
            vectors = out["region_vectors"].to(self.region_probe.weight.dtype)
            logits = self.region_probe(F.layer_norm(vectors, vectors.shape[-1:]))
            out["attr_loss"] = out["attr_loss"] + self.region_weight * self.probes._ce(
                logits, batch.region_attributes.to(logits.device))
        out["loss"] = out["loss"] + out["attr_loss"]
        return out


class Sa2VAProbedModel(_Probed):
    """A Sa2VA model plus attribute probes (the same three linear classifiers as :class:`ProbedModel`, on
    Sa2VA's tensors): on SAM2's lowest-level backbone features of every frame it encodes (each cell of its
    low-resolution mask grid: colour, shape, size or background), on each projected ``[SEG]`` prompt (its
    object's classes), and, with ``token_weight``, on the image tokens the LLM reads (each token's cell of the
    frame). A from-scratch SAM2 otherwise learns which object a name means only from the mask losses, slowly; and
    a motion question ("the shape moving up" -> "the yellow star") can only be answered from image tokens that
    say what is where in each key frame. ``.model`` is what gets exported."""

    def __init__(self, model: nn.Module, weight: float, token_weight: float = 0.0, position_weight: float = 0.0):
        super().__init__()
        from ..datasets.shapes import COLORS, SHAPES, SIZES

        self.model = model
        self.weight, self.token_weight = float(weight), float(token_weight)
        classes = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
        self.probes = AttributeProbes(model.grounding_encoder.sam2_model.hidden_dim, model.config.out_dim, classes)
        if self.token_weight:
            self.token_probe = nn.Linear(model.hidden_size, sum(classes))
        self._make_position_probe(model.hidden_size, math.isqrt(model.tokens_per_tile), position_weight)

    def forward(self, batch, *args, **kwargs) -> dict[str, torch.Tensor]:
        out = self.model(batch, *args, **kwargs)
        if self.position_weight and out.get("image_tokens") is not None and len(out["image_tokens"]):
            out["position_loss"] = self._position_loss(out["image_tokens"])
            out["loss"] = out["loss"] + out["position_loss"]
        if batch.frame_attributes is None or "sam_embeddings" not in out:
            out["attr_loss"] = out["loss"].new_zeros(())
            return out
        feats = out["sam_embeddings"]
        labels = batch.frame_attributes[out["sam_frames"]].to(feats.device).long()  # (N, 3, g, g)
        image, prompt = self.probes.losses(feats, out["seg_embeddings"], labels, batch.mask_attributes)
        attr = self.weight * (image + prompt)
        if self.token_weight and batch.tile_attributes is not None:
            # (n_tiles, t * t, H) row-major tokens, (n_tiles, 3, t * t) labels
            attr = attr + self.token_weight * self._token_loss(out["image_tokens"],
                                                               batch.tile_attributes.long().flatten(2))
        out["attr_loss"] = attr
        out["loss"] = out["loss"] + attr
        return out
