"""GLaMM: LISA's parts on LLaVA-1.5, plus region prompts and grounded conversation (reference/glamm.md).

:class:`GlammModel` is :class:`~groundseg.grounding.lisa.LisaModel` (CLIP + ``mlp2x_gelu`` projector + LLaMA,
``text_hidden_fcs``, SAM; the ``[SEG]`` state is the one *before* each ``[SEG]``) with three additions:

* a :class:`~groundseg.grounding.region.RegionEncoder` reading four CLIP levels of the same tower pass; each
  ``<bbox>`` in a prompt takes the next box's vector, in order (region captions, multi-region questions);
* GLaMM's first-turn wording ``"The <image> provides an overview of the picture.\\n" + question``;
* grounded conversation generation (GCG): in ``"A <p> man </p> [SEG] rides a <p> horse </p> [SEG]."`` each
  ``[SEG]`` mask is paired with the phrase right before it (:func:`gcg_pairs`); ``Result.phrases`` holds them.

Everything goes through :meth:`GlammModel.segment` (``boxes=`` for region prompts; the prompt
``config.gcg_prompt`` for GCG, see :meth:`GlammModel.gcg`), ``segment_teacher_forced`` (referring segmentation)
and ``forward`` (training: CE + BCE + Dice, region rows with ``LisaBatch.region_boxes``).

Token ids are looked up by name (``<bbox>``, ``[SEG]``, ...). The official loader ends with
``config.bbox_token_idx = 32002`` whatever the tokenizer says (reference: parity/glamm_tiny notes); for the real
tokenizer that is its ``<bbox>`` id (GLaMM's seven tokens are 32000-32006), and for any other tokenizer the
name lookup is the right id.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from ..config import GlammConfig
from .lisa import LisaModel
from .region import RegionEncoder, region_layer_indices, replace_bbox_embeddings
from .conversation import image_question
from .tokens import BBOX, IM_END, IM_START, P_END, P_START, SEG, parse_phrases, token_id
from .vlm import Embedded

GLAMM_TOKENS = (IM_START, IM_END, BBOX, "<point>", SEG, P_START, P_END)
"""GLaMM's added tokens in the order ``train.py`` adds them: ids 32000-32006 on the 32000-piece LLaMA vocab."""


def gcg_pairs(text: str) -> list[tuple[str | None, int]]:
    """Pair each ``[SEG]`` of a GCG answer with its phrase: ``[(phrase or None, seg_index), ...]``, one entry per
    ``[SEG]`` in order.

    The phrase of a ``[SEG]`` is the ``<p>...</p>`` right before it (nothing but another phrase's ``[SEG]`` may come
    in between). When every phrase is followed by one ``[SEG]`` -- the form GLaMM is trained on -- this is GLaMM's
    own k-th phrase <-> k-th mask rule; when the model's markup is broken it keeps the pairs that are still
    certain: an unterminated ``<p>``, a stray ``</p>`` or a "phrase" with a ``[SEG]`` inside names nothing, and a
    ``[SEG]`` without a phrase (more ``[SEG]`` than phrases) gets None."""
    n_seg = text.count(SEG)
    phrase_of: dict[int, str] = {}
    for p in parse_phrases(text):
        if SEG in p.phrase:  # "<p> dog [SEG] </p>": the tags do not delimit a phrase
            continue
        if p.seg_index is not None and p.seg_index not in phrase_of:
            phrase_of[p.seg_index] = p.phrase
    return [(phrase_of.get(k), k) for k in range(n_seg)]


_TAG = re.compile(r"<[^<>]*>")


def clean_caption(text: str) -> str:
    """GLaMM's evaluation cleaning of a GCG answer: drop ``[SEG]`` and every ``<...>`` tag, collapse whitespace,
    strip quotes (reference/glamm.md §3, "Decoding/post-processing"). Newlines are deleted first, joining what
    they separate, as the official post-processing does."""
    text = _TAG.sub("", text.replace("\n", "")).replace(SEG, "")
    return " ".join(text.split()).strip("'").strip()


class GlammModel(LisaModel):
    """GLaMM = LISA's composition + :class:`RegionEncoder` (parameters ``region_encoder.*``)."""

    family = "glamm"
    supports_regions = True

    def __init__(self, config: GlammConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.region_encoder = RegionEncoder(config.region)
        self.region_levels = region_layer_indices(int(config.vision.clip["num_hidden_layers"]),
                                                  config.vision.select_layer, config.region.num_levels)
        if tokenizer is not None:
            self.bbox_token_id = token_id(tokenizer, BBOX)

    # ------------------------------------------------------------------------------------------ prompts

    def first_question(self, question: str) -> str:
        return image_question(question, self.config.use_im_start_end, self.config.image_prefix)

    def _encode_clip(self, clip: torch.Tensor):
        return self.vlm.encode_images_with_levels(clip, self.region_levels)

    def encode_regions(self, levels: list[torch.Tensor], boxes: Sequence[torch.Tensor]):
        """Region encoder on CLIP ``levels`` (each (B, g*g, C)) and B lists of normalised boxes."""
        return self.region_encoder(levels, boxes)

    def _with_regions(self, emb: Embedded, levels, row_images: list[int], row_boxes) -> Embedded:
        """Replace each row's ``<bbox>`` embeddings by its boxes' region vectors (a count mismatch raises)."""
        has_bbox = bool((emb.token_ids == self.bbox_token_id).any())
        rows = [] if row_boxes is None else [r for r, b in enumerate(row_boxes) if b is not None and len(b)]
        if not rows and not has_bbox:
            return emb
        feats: list[torch.Tensor | None] = [None] * emb.inputs_embeds.shape[0]
        if rows:
            idx = [row_images[r] for r in rows]
            out = self.encode_regions([lv[idx] for lv in levels],
                                      [row_boxes[r].to(levels[0].device) for r in rows])
            for r, f in zip(rows, out.features):
                feats[r] = f
        embeds = replace_bbox_embeddings(emb.inputs_embeds, emb.token_ids, self.bbox_token_id, feats)
        vectors = torch.cat([f for f in feats if f is not None]) if rows else None
        return Embedded(embeds, emb.attention_mask, emb.labels, emb.token_ids, vectors)

    def _decode_answer(self, ids: list[int]) -> str:
        # GLaMM's tokens are special tokens: keep them ([SEG], <p>, </p> are the answer's grounding), drop only
        # the sequence markers.
        drop = {self.tokenizer.bos_token_id, self.eos_id, self.pad_id}
        return self.tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False).strip()

    def _phrases(self, answer: str, n_seg: int) -> list[str | None]:
        pairs = gcg_pairs(answer)
        return [p for p, _ in pairs][:n_seg] + [None] * max(0, n_seg - len(pairs))

    # ------------------------------------------------------------------------------------------ tasks

    def gcg(self, images, max_new_tokens: int = 512):
        """Grounded conversation generation: a caption whose phrases each come with a mask
        (``Result.phrases[k]`` names ``Result.masks[k]``)."""
        return self.segment(images, self.config.gcg_prompt, max_new_tokens=max_new_tokens)

    def caption_regions(self, image, boxes: Sequence[Sequence[float]], prompt: str | None = None,
                        max_new_tokens: int = 128):
        """Describe the region(s) in ``boxes`` (pixel xyxy). ``prompt`` needs one ``<bbox>`` per box; the default is
        GLaMM's region-caption question (one box)."""
        return self.segment(image, prompt or self.config.region_prompt, max_new_tokens=max_new_tokens,
                            boxes=boxes)[0]


def gcg_overlay(image_rgb: np.ndarray, masks: np.ndarray, phrases: Sequence[str | None], text: str | None = None
                ) -> np.ndarray:
    """The image with mask k filled in colour k (``io.PALETTE``) and labelled with its phrase, the answer as a
    banner, and below the image a legend: one row per mask, its colour swatch and ``k. phrase``.
    Returns (H + legend, W, 3) uint8."""
    import cv2

    from ..io import PALETTE, overlay

    masks = np.asarray(masks, dtype=bool).reshape(-1, *np.asarray(image_rgb).shape[:2])
    shown = overlay(image_rgb, masks, clean_caption(text) if text else None, phrases=list(phrases))
    h, w = shown.shape[:2]
    scale = max(0.4, min(1.0, w / 900))
    thick = max(1, round(scale * 1.5))
    row = int(28 * scale) + 8
    legend = np.full((row * max(1, len(masks)) + 8, w, 3), 255, np.uint8)
    if not len(masks):
        cv2.putText(legend, "no grounded phrases", (8, row - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    for k, phrase in enumerate(phrases):
        y = 4 + k * row
        cv2.rectangle(legend, (8, y + 3), (8 + row - 6, y + row - 3), PALETTE[k % len(PALETTE)], -1)
        label = f"{k + 1}. {phrase if phrase else '(no phrase)'}"
        label = label.encode("ascii", "replace").decode()
        cv2.putText(legend, label, (row + 10, y + row - 9), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    return np.concatenate([shown, legend])
