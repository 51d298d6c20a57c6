"""LISA: a LLaVA v1 model whose ``[SEG]`` tokens prompt SAM (reference/lisa.md).

Three paths share the parts:

* :meth:`LisaModel.segment` -- chat: greedy KV-cache generation, then one mask per ``[SEG]`` (and per ``<box>``) in
  the answer, every prompt of an image decoded in one SAM call. With ``config.box_from_mask`` a ``<box>``'s
  coordinates are written during generation from the mask its state prompts (:meth:`LisaModel._box_continuation`).
* :meth:`LisaModel.segment_teacher_forced` -- LISA's evaluation: the answer is fixed to ``"[SEG]."`` and all
  expressions of an image go through the LLM in one batched forward.
* :meth:`LisaModel.forward` -- training: LISA's CE + BCE + Dice losses on a collated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import LisaConfig
from ..decoders.projector import TextHiddenProjector
from ..decoders.sam import SamDecoder, sam_preprocess
from ..io import InputError, load_image, masks_to_boxes_xyxy
from ..result import Result
from ..train.losses import mask_losses, token_ce
from .conversation import Conversation, PromptTokenizer, image_question
from .tokens import BOX_START, SEG, format_box, parse_boxes, token_id
from .vlm import Embedded, VisionLanguageModel

EVAL_QUESTION = "What is {} in this image? Please output segmentation mask."


@dataclass
class PreparedImage:
    """One image, preprocessed for both encoders. ``clip`` (3, s, s); ``sam`` (3, S, S); sizes are (h, w)."""

    rgb: np.ndarray
    clip: torch.Tensor
    sam: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class LisaBatch:
    """A collated training/eval batch (LISA's ``collate_fn`` layout).

    ``input_ids``/``labels`` (B_conv, L) with one ``<image>`` (-200) per row, right-padded; ``clip_pixel_values``
    (B_img, 3, s, s); ``sam_pixel_values`` (B_img, 3, S, S); ``offset`` (B_img + 1,) conversation boundaries
    per image; ``gt_masks`` one (n_i, H_i, W_i) tensor per image, n_i = number of ``[SEG]`` in its conversations.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    clip_pixel_values: torch.Tensor
    sam_pixel_values: torch.Tensor
    offset: torch.Tensor
    input_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    gt_masks: list[torch.Tensor]
    # Region prompts (GLaMM): per conversation row, (n_r, 4) boxes normalised to the original image, in the order of
    # the row's <bbox> placeholders (None or empty: no boxes). Rows with boxes need no masks and may come without
    # SAM inputs (``sam_pixel_values`` None).
    region_boxes: list[torch.Tensor | None] | None = None
    # Shapes-world extras for the auxiliary attribute loss (train/probes.py): (B_img, 3, g, g) class labels on
    # SAM's low-resolution grid and (n_masks, 3) the classes of each mask's object.
    attribute_maps: torch.Tensor | None = None
    mask_attributes: torch.Tensor | None = None
    token_attribute_maps: torch.Tensor | None = None  # (B, 3, g, g) on the vision tower's patch grid
    region_attributes: torch.Tensor | None = None  # (n, 3): classes of each region box's object, rows in order
    tasks: list[str] | None = None


def clip_preprocess(rgb: np.ndarray, config: LisaConfig) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, s, s): shortest side to s (PIL bicubic), centre crop, /255, CLIP mean/std --
    what LISA's pinned ``CLIPImageProcessor`` did (transformers 5's default processor resizes with
    torchvision instead, which moves pixels by a few levels)."""
    s = config.vision.image_size
    h, w = rgb.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(s * long / short)
    size = (s, new_long) if h <= w else (new_long, s)  # (h, w)
    img = Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    top, left = (size[0] - s) // 2, (size[1] - s) // 2
    arr = arr[top:top + s, left:left + s] * (1 / 255)
    arr = (arr - np.array(config.clip_mean, np.float32)) / np.array(config.clip_std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def prepare_image(image, config: LisaConfig) -> PreparedImage:
    """Any image input (path, array, PIL) -> both encoders' inputs; needs only the config (data loaders)."""
    rgb = load_image(image)
    sam, input_size = sam_preprocess(rgb, config.sam)
    return PreparedImage(rgb, clip_preprocess(rgb, config), sam, input_size, rgb.shape[:2])


class LisaModel(nn.Module):
    """LISA = :class:`VisionLanguageModel` + :class:`TextHiddenProjector` + :class:`SamDecoder`.

    Parameter names: ``vlm.vision_tower.*`` (CLIP), ``vlm.projector.*``, ``vlm.language_model.*``,
    ``seg_projector.text_hidden_fcs.*``, ``sam.sam.*`` (segment-anything ``Sam``)."""

    family = "lisa"

    def __init__(self, config: LisaConfig, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vlm = VisionLanguageModel(config.vision, config.projector, config.llm)
        self.seg_projector = TextHiddenProjector(self.vlm.hidden_size, config.out_dim)
        self.sam = SamDecoder(config.sam)
        if config.out_dim != config.sam.prompt_embed_dim:
            raise ValueError(f"out_dim {config.out_dim} != SAM prompt_embed_dim {config.sam.prompt_embed_dim}")
        self.conversation = Conversation(config.system)
        if tokenizer is None:  # structure only (e.g. a meta-device build to check checkpoint layouts)
            return
        self.prompt_tokenizer = PromptTokenizer(tokenizer, config.tokenization)
        self.seg_token_id = token_id(tokenizer, SEG)
        # box_from_mask: the <box> token prompts SAM too (its id must be one token of the vocabulary).
        self.box_token_id = token_id(tokenizer, BOX_START) if config.box_from_mask else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.eos_id = tokenizer.eos_token_id
        if len(tokenizer) > config.llm["vocab_size"]:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocab_size is "
                             f"{config.llm['vocab_size']}")

    @property
    def device(self) -> torch.device:
        return self.seg_projector.text_hidden_fcs[0][0].weight.device

    # ------------------------------------------------------------------------------------------ images

    def clip_preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, s, s) for the vision tower (see :func:`clip_preprocess`)."""
        return clip_preprocess(rgb, self.config)

    def prepare_image(self, image) -> PreparedImage:
        return prepare_image(image, self.config)

    # ------------------------------------------------------------------------------------------ prompts

    def first_question(self, question: str) -> str:
        """The first user turn: the image placeholder and the question (GLaMM adds its overview sentence)."""
        return image_question(question, self.config.use_im_start_end)

    def chat_prompt(self, question: str) -> str:
        """The llava_v1 prompt with an open assistant turn."""
        return self.conversation.prompt([(self.first_question(question), None)])

    # Hooks for families that add to LISA (GLaMM: region prompts, phrase <-> mask pairs). LISA has no region
    # encoder, so box prompts are refused.

    def _encode_clip(self, clip: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(B, 3, s, s) -> projected image tokens (B, N, H) and the region encoder's CLIP levels (None here)."""
        return self.vlm.encode_images(clip), None

    def _with_regions(self, emb, levels, row_images: list[int], row_boxes) -> Embedded:
        if row_boxes is not None and any(b is not None and len(b) for b in row_boxes):
            raise InputError(f"the {self.family} family has no region encoder, so it cannot take box prompts "
                             "(--box); use a GLaMM model")
        return emb

    def _decode_answer(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _phrases(self, answer: str, n_seg: int) -> list[str | None]:
        """One phrase (or None) per [SEG] of ``answer``."""
        return [None] * n_seg

    def _embed_batch(self, id_lists: list[list[int]], image_features: torch.Tensor, left_pad: bool):
        """Pad id lists (left or right), splice image features (B, N, H) -> Embedded."""
        length = max(len(x) for x in id_lists)
        rows = []
        for ids in id_lists:
            pad = [self.pad_id] * (length - len(ids))
            rows.append(pad + ids if left_pad else ids + pad)
        input_ids = torch.tensor(rows, device=self.device)
        return self.vlm.embed(input_ids, image_features, self.pad_id)

    def _seg_states(self, token_ids: torch.Tensor, states: torch.Tensor,
                    prompt_ids: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per row, the last-layer states that feed the mask decoder, one per ``[SEG]`` (one per token of
        ``prompt_ids`` in text order, if given: ``[SEG]`` and ``<box>`` for ``box_from_mask`` training).

        LISA uses the state at the position BEFORE each ``[SEG]``: the state whose logits predicted ``[SEG]``.
        Its released weights learnt ``text_hidden_fcs`` on exactly that state (the training mask is
        ``input_ids[:, 1:] == [SEG]`` laid over unshifted hidden states, reference/lisa.md §1.6), so any other
        choice gives different masks from the same checkpoint."""
        out = []
        ids = torch.as_tensor(prompt_ids if prompt_ids is not None else [self.seg_token_id], device=token_ids.device)
        for r in range(token_ids.shape[0]):
            pos = torch.isin(token_ids[r], ids).nonzero().flatten()
            pos = pos[pos > 0] - 1
            out.append(states[r, pos])
        return out

    # ------------------------------------------------------------------------------------------ chat

    @torch.no_grad()
    def segment(self, images, prompts: str | Sequence[str], max_new_tokens: int = 128,
                boxes: Sequence | None = None, answer: str | None = None) -> list[Result]:
        """Ground each (image, prompt) pair.

        ``images``: one image (path, array or PIL) or a list; ``prompts``: one string or a list. One image with
        many prompts encodes the image once; one prompt with many images applies it to each; two lists pair up.
        ``answer`` fixes the answer instead of generating it (LISA's evaluation path, teacher-forced; ``{}`` in it
        stands for the prompt, e.g. ``"Sure, {} [SEG]."``): every prompt then goes through one forward.
        Returns one :class:`Result` per pair, masks at the image's original size."""
        image_list, pairs = pair_prompts(images, prompts)
        prepared = [self.prepare_image(im) for im in image_list]
        # Box prompts: pixel boxes on each image, the same boxes for every prompt, normalised per image.
        row_boxes = None
        if boxes:
            row_boxes = [torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
                         / torch.tensor([prepared[i].original_size[1], prepared[i].original_size[0]] * 2)
                         for i, _ in pairs]
        row_images = [i for i, _ in pairs]
        clip = torch.stack([p.clip for p in prepared]).to(self.device)
        image_features, levels = self._encode_clip(clip)  # (I, N, H), once per image
        sam_embeddings = self.sam.encode(torch.stack([p.sam for p in prepared]).to(self.device))

        feats = image_features[[i for i, _ in pairs]]
        box_masks = None  # box_from_mask: per row, the mask logits each generated box was written from
        if answer is not None:  # teacher-forced: the answer is given, one forward for every prompt
            answers = [answer.replace("{}", p.strip()) for _, p in pairs]
            id_lists = [self.prompt_tokenizer(self.conversation.prompt(
                [(self.first_question(p), a)])) for (_, p), a in zip(pairs, answers)]
            emb = self._with_regions(self._embed_batch(id_lists, feats, left_pad=False), levels, row_images,
                                     row_boxes)
            states, _ = self.vlm.run(emb.inputs_embeds, emb.attention_mask)
            seg_states = self._seg_states(emb.token_ids, states)
        else:
            id_lists = [self.prompt_tokenizer(self.chat_prompt(p)) for _, p in pairs]
            emb = self._with_regions(self._embed_batch(id_lists, feats, left_pad=True), levels, row_images,
                                     row_boxes)
            hook = None
            if self.config.box_from_mask:
                box_masks = [[] for _ in pairs]
                hook = self._box_continuation([prepared[i] for i, _ in pairs], sam_embeddings[row_images], box_masks)
            gen = self.vlm.generate(emb.inputs_embeds, emb.attention_mask, emb.token_ids, max_new_tokens,
                                    self.eos_id, self.pad_id, continue_with=hook)
            seg_states = self._seg_states(gen.token_ids, gen.hidden_states)
            answers = [self._decode_answer(t) for t in gen.new_tokens]

        results: list[Result | None] = [None] * len(pairs)
        for img_idx, prep in enumerate(prepared):
            members = [k for k, (i, _) in enumerate(pairs) if i == img_idx]
            if not members:
                continue
            results_for = self._decode_image(prep, sam_embeddings[img_idx:img_idx + 1],
                                             [seg_states[k] for k in members], [answers[k] for k in members],
                                             [box_masks[k] for k in members] if box_masks is not None else None)
            for k, res in zip(members, results_for):
                results[k] = res
        return results

    def _decode_image(self, prep: PreparedImage, sam_embedding: torch.Tensor, seg_states: list[torch.Tensor],
                      answers: list[str], box_masks: list[list[torch.Tensor]] | None = None) -> list[Result]:
        """All [SEG] and <box> prompts of every answer about one image, in one mask-decoder call.

        A ``<box>`` becomes a SAM box prompt, unless ``box_masks`` (``box_from_mask``) already hold, per answer, the
        mask logits each of its boxes was written from during generation."""
        h, w = prep.original_size
        text_embeds = [self.seg_projector(s) for s in seg_states]
        answer_boxes = [parse_boxes(a, (h, w)) for a in answers]
        n_seg = [len(t) for t in text_embeds]
        n_box = [len(b) for b in answer_boxes] if box_masks is None else [0] * len(answers)
        logits = torch.zeros(0, h, w)
        if sum(n_seg) + sum(n_box):
            boxes = None
            if sum(n_box):
                xyxy = torch.tensor([b.box for bs in answer_boxes for b in bs], device=self.device)
                boxes = self.sam.box_to_input_frame(xyxy, prep.original_size)
            low_res, _ = self.sam.decode(sam_embedding, torch.cat(text_embeds) if sum(n_seg) else None, boxes)
            logits = self.sam.postprocess(low_res, prep.input_size, prep.original_size)[:, 0].cpu()
        seg_logits, box_logits = logits[:sum(n_seg)].split(n_seg), logits[sum(n_seg):].split(n_box)
        if box_masks is not None:  # a box whose text was cut short (max_new_tokens) has no parsed entry
            box_logits = [torch.stack(m[:len(bs)]) if len(bs) else torch.zeros(0, h, w)
                          for m, bs in zip(box_masks, answer_boxes)]
        out = []
        for answer, sl, bl, bs in zip(answers, seg_logits, box_logits, answer_boxes):
            both = torch.cat([sl, bl])
            phrases = self._phrases(answer, len(sl)) + [b.phrase for b in bs]
            sources = ["seg"] * len(sl) + ["box"] * len(bs)
            out.append(make_result(answer, both, phrases, sources))
        return out

    def _box_continuation(self, row_prepared: list[PreparedImage], row_sam: torch.Tensor,
                          made: list[list[torch.Tensor]]):
        """``vlm.generate``'s ``continue_with`` for ``box_from_mask``: when a row chooses ``<box>``, the state that
        chose it prompts SAM on the row's image, and the row is made to write that mask's box,
        ``(x1,y1),(x2,y2)</box>`` on the 0-1000 grid: the box of the mask's largest connected part, so a few stray
        pixels elsewhere do not stretch it (an empty mask gives the whole image's box). That part's logits (the
        rest pushed below 0) are appended to ``made[row]``: the mask reported for the box."""
        def hook(row: int, token: int, state: torch.Tensor) -> list[int]:
            if token != self.box_token_id:
                return []
            prep = row_prepared[row]
            low_res, _ = self.sam.decode(row_sam[row:row + 1], self.seg_projector(state[None]))
            logits = self.sam.postprocess(low_res, prep.input_size, prep.original_size)[0, 0].float().cpu()
            mask = largest_component(logits > 0)
            made[row].append(torch.where(torch.from_numpy(mask), logits, logits.clamp(max=-1e-4)))
            h, w = prep.original_size
            box = masks_to_boxes_xyxy(mask[None])[0] if mask.any() else np.array([0, 0, w, h], np.float32)
            text = format_box(box, (h, w))[len(BOX_START):]  # "(x1,y1),(x2,y2)</box>"
            return self.prompt_tokenizer.encode_chunk(text)
        return hook

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def segment_teacher_forced(self, image, expressions: Sequence[str], question: str = EVAL_QUESTION,
                               answer: str | None = None) -> torch.Tensor:
        """LISA's evaluation path: one forward for all ``expressions`` of one image, the answer fixed to
        ``answer`` (default: the config's ``answer_template``, LISA's ``"[SEG]."``; a ``{}`` in it is replaced by
        the expression, for models trained to answer with a grounded phrase). Returns (E, H, W) float32 mask
        logits at the original size."""
        answer = self.config.answer_template if answer is None else answer
        prep = self.prepare_image(image)
        feats = self.vlm.encode_images(prep.clip[None].to(self.device))
        prompts = [self.conversation.prompt([(self.first_question(question.format(e)), answer.replace("{}", e))])
                   for e in expressions]
        emb = self._embed_batch([self.prompt_tokenizer(p) for p in prompts],
                                feats.expand(len(prompts), -1, -1), left_pad=False)
        states, _ = self.vlm.run(emb.inputs_embeds, emb.attention_mask)
        seg = self._seg_states(emb.token_ids, states)
        if any(len(s) != 1 for s in seg):
            raise ValueError("each teacher-forced answer must contain exactly one [SEG]")
        sam_emb = self.sam.encode(prep.sam[None].to(self.device))
        low_res, _ = self.sam.decode(sam_emb, self.seg_projector(torch.cat(seg)))
        return self.sam.postprocess(low_res, prep.input_size, prep.original_size)[:, 0]

    # ------------------------------------------------------------------------------------------ training

    def forward(self, batch: LisaBatch) -> dict[str, torch.Tensor]:
        """LISA's training losses: ``ce_loss``, ``mask_bce_loss``, ``mask_dice_loss``, ``mask_loss``, ``loss``;
        also ``pred_masks`` (per-image (n_i, H_i, W_i) logits at the original size)."""
        dev = self.device
        offset = batch.offset.tolist()
        feats, levels = self._encode_clip(batch.clip_pixel_values.to(dev))
        row_images = [i for i in range(len(offset) - 1) for _ in range(offset[i], offset[i + 1])]
        emb = self.vlm.embed(batch.input_ids.to(dev), feats[row_images], self.pad_id, batch.labels.to(dev))
        emb = self._with_regions(emb, levels, row_images, batch.region_boxes)
        states, _ = self.vlm.run(emb.inputs_embeds, emb.attention_mask)
        ce = token_ce(self.vlm.logits(states), emb.labels) * self.config.losses.ce_weight
        seg = self._seg_states(emb.token_ids, states,
                               [self.seg_token_id, self.box_token_id] if self.config.box_from_mask else None)
        if batch.sam_pixel_values is None:  # text-only targets (e.g. region captions): no mask losses
            if any(len(s) for s in seg):
                raise ValueError("a batch without SAM inputs has [SEG] tokens in its conversations")
            zero = ce.new_zeros(())
            return {"loss": ce, "ce_loss": ce, "mask_bce_loss": zero, "mask_dice_loss": zero, "mask_loss": zero,
                    "pred_masks": [], "sam_embeddings": None, "seg_prompts": ce.new_zeros(0, self.config.out_dim),
                    "image_tokens": feats, "region_vectors": emb.region_vectors}
        with torch.no_grad() if not any(p.requires_grad for p in self.sam.sam.image_encoder.parameters()) \
                else torch.enable_grad():
            sam_emb = self.sam.encode(batch.sam_pixel_values.to(dev))
        pred_masks, prompts = [], []
        for i in range(len(offset) - 1):
            states_i = [s for s in seg[offset[i]:offset[i + 1]] if len(s)]
            if not states_i:
                pred_masks.append(torch.zeros(0, *batch.original_sizes[i], device=dev))
                continue
            prompts.append(self.seg_projector(torch.cat(states_i)))
            low_res, _ = self.sam.decode(sam_emb[i:i + 1], prompts[-1])
            pred_masks.append(self.sam.postprocess(low_res, batch.input_sizes[i], batch.original_sizes[i])[:, 0])
        bce, dice = mask_losses(pred_masks, [g.to(dev) for g in batch.gt_masks], self.config.losses)
        mask_loss = bce + dice
        return {"loss": ce + mask_loss, "ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice,
                "mask_loss": mask_loss, "pred_masks": pred_masks, "sam_embeddings": sam_emb, "image_tokens": feats,
                "region_vectors": emb.region_vectors,
                "seg_prompts": torch.cat(prompts) if prompts else sam_emb.new_zeros(0, self.config.out_dim)}


def largest_component(mask) -> np.ndarray:
    """The largest 8-connected part of a boolean (H, W) mask (array or tensor), as a bool array; empty stays
    empty."""
    import cv2

    m = np.ascontiguousarray(mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 2:  # background plus at most one part
        return m.astype(bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def pair_prompts(images, prompts: str | Sequence[str]) -> tuple[list, list[tuple[int, str]]]:
    """(image list, [(image index, prompt)]) for ``segment``'s arguments: one image with many prompts, one prompt
    over many images, or two lists of the same length that pair up. Empty prompts are an :class:`InputError`."""
    image_list = list(images) if isinstance(images, (list, tuple)) else [images]
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(image_list) == 1:
        pairs = [(0, p) for p in prompt_list]
    elif len(prompt_list) == 1:
        pairs = [(i, prompt_list[0]) for i in range(len(image_list))]
    elif len(prompt_list) == len(image_list):
        pairs = list(enumerate(prompt_list))
    else:
        raise InputError(f"{len(image_list)} images and {len(prompt_list)} prompts: give one prompt, "
                         "one image, or as many prompts as images")
    for _, p in pairs:
        if not p or not p.strip():
            raise InputError("prompt is empty: expected a sentence describing what to segment")
    return image_list, pairs


def make_result(text: str, logits: torch.Tensor, phrases: list[str | None], sources: list[str]) -> Result:
    """(N, H, W) logits -> Result with masks ``logits > 0``, mean-probability scores and mask boxes."""
    masks = (logits > 0).numpy()
    flat = masks.reshape(len(masks), -1 if len(masks) else 0)
    prob = logits.float().sigmoid().numpy().reshape(flat.shape)
    area = flat.sum(1)
    scores = np.where(area > 0, (prob * flat).sum(1) / np.maximum(area, 1), 0.0)
    return Result(text=text, masks=masks, scores=scores.astype(np.float32), boxes=masks_to_boxes_xyxy(masks),
                  phrases=list(phrases), sources=list(sources))
