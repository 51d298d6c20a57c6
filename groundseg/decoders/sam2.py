"""SAM2 as a promptable image and video mask decoder, on the ``sam2`` package.

The model is the package's own ``SAM2Base``, built from one of the configs shipped inside the package (hydra
names such as ``configs/sam2/sam2_hiera_l.yaml``) with hydra overrides for other sizes, and never with a checkpoint
path: weights come from ``hub.py``. On top of it this module adds what Sa2VA changed and what streaming needs:

* a language prompt: a projected ``[SEG]`` state becomes a third sparse token after the prompt encoder's two
  "not a point" tokens (no points given, so SAM2 pads with a label -1 point, and the prompt encoder pads again);
* the object score does not blank the mask (Sa2VA removed SAM2's ``NO_OBJ_SCORE`` gating); it still gates the
  object pointer (``fixed_no_obj_ptr``);
* video without ``init_state``: frames arrive one at a time (:meth:`Sam2Decoder.propagate`), each is encoded
  once for every object, and the memory keeps the conditioning frames plus only the few recent frames that
  SAM2's memory attention can reach, so host and device memory stay flat in video length.

Shapes: S = ``image_size`` (1024 in every release), h = S/16 the embedding grid, low-res masks are 4h.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import Sam2Config

# Mask-decoder settings every Sa2VA release sets in its SAM2 (reference/sa2va.md §1.2); the rest of its flags are
# those of the package's sam2_hiera_*.yaml configs.
SA2VA_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)


def build_sam2_model(cfg: Sam2Config, device: str | torch.device | None = None):
    """The package's ``SAM2Base`` for ``cfg``, randomly initialised, in eval mode: what ``build_sam2`` does with
    ``ckpt_path=None``, without its final ``.to(device)`` so that it also builds under ``init_empty_weights``.
    ``device="meta"`` allocates nothing (for checking key layouts)."""
    import sam2  # noqa: F401  (initialises hydra on the package's config module)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    overrides = list(cfg.overrides) + [o for o in SA2VA_OVERRIDES if o not in cfg.overrides]
    conf = compose(config_name=cfg.config_file, overrides=overrides)
    OmegaConf.resolve(conf)
    if str(device) == "meta":  # parameters only: SAM2's constructors compute Python numbers from tensors
        from accelerate import init_empty_weights

        ctx = init_empty_weights(include_buffers=False)
    else:
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        model = instantiate(conf.model, _recursive_=True)
    return model.eval()


def sam2_preprocess(rgb: np.ndarray, size: int, resize: str, mean: tuple, std: tuple) -> torch.Tensor:
    """:meth:`Sam2Decoder.preprocess` without a model (DataLoader workers collate with it)."""
    filt = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resize]
    arr = np.asarray(Image.fromarray(rgb).resize((size, size), filt), dtype=np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / sd


# ----------------------------------------------------------------------------------------------- outputs

@dataclass
class Sam2Features:
    """One frame's backbone features, ready for the heads (B = 1 per frame; repeated per object when used).

    ``vision_feats``/``vision_pos``: per level (HW, B, C) (SAM2's flattened layout); ``feat_sizes`` per level
    (H, W); ``high_res``: levels 0/1 as (B, C', 4h, 4w)/(B, C'', 2h, 2w) after ``conv_s0``/``conv_s1``."""

    vision_feats: list[torch.Tensor]
    vision_pos: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]
    backbone_fpn: list[torch.Tensor]

    @property
    def high_res(self) -> list[torch.Tensor]:
        return [x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], *s)
                for x, s in zip(self.vision_feats[:-1], self.feat_sizes[:-1])]

    @property
    def batch(self) -> int:
        return int(self.vision_feats[-1].shape[1])

    def select(self, rows) -> "Sam2Features":
        """Batch entries ``rows`` (e.g. each tracked object's own frame when objects come from different videos)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.vision_feats[-1].device)
        return Sam2Features([x[:, rows] for x in self.vision_feats], [x[:, rows] for x in self.vision_pos],
                            self.feat_sizes, [x[rows] for x in self.backbone_fpn])

    def for_objects(self, n: int) -> "Sam2Features":
        """Features for ``n`` objects: as they are when already batched per object, else one frame repeated."""
        if self.batch == n:
            return self
        if self.batch != 1:
            raise ValueError(f"features of batch {self.batch} for {n} objects")
        return self.repeat(n)

    def repeat(self, n: int) -> "Sam2Features":
        """The same features for ``n`` objects (batch dimension repeated)."""
        if n == 1:
            return self
        return Sam2Features([x.repeat(1, n, 1) for x in self.vision_feats],
                            [x.repeat(1, n, 1) for x in self.vision_pos], self.feat_sizes, self.backbone_fpn)


@dataclass
class HeadOutput:
    """What the SAM heads give for B prompts on one frame.

    ``multimasks`` (B, M, 4h, 4w) logits (M = 3 with multimask output, else 1); ``ious`` (B, M);
    ``low_res_masks`` (B, 1, 4h, 4w) the best-IoU mask; ``best_index`` (B,); ``obj_ptr`` (B, C) after the
    object-score gate; ``object_score_logits`` (B, 1); ``sparse_embeddings`` (B, T, C) the prompt tokens given to
    the decoder; ``mask_tokens`` (B, M, C) the decoder's output tokens."""

    multimasks: torch.Tensor
    ious: torch.Tensor
    low_res_masks: torch.Tensor
    best_index: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor
    sparse_embeddings: torch.Tensor
    mask_tokens: torch.Tensor


@dataclass
class FrameOutput:
    """One tracked frame: ``low_res_masks`` (N, 1, 4h, 4w) logits for the N objects, ``ious`` (N, M) and
    ``object_score_logits`` (N, 1); ``conditioning`` tells whether the frame was a prompted (key) frame."""

    frame_idx: int
    low_res_masks: torch.Tensor
    ious: torch.Tensor
    object_score_logits: torch.Tensor
    conditioning: bool
    multimasks: torch.Tensor | None = None  # (N, M, 4h, 4w) every candidate mask (training's losses use them)


@dataclass
class VideoMemory:
    """SAM2's memory bank for N objects, bounded: every conditioning frame, plus the last
    ``keep`` tracked frames (what the memory attention and the object pointers can reach).

    Entries are ``{"maskmem_features", "maskmem_pos_enc", "obj_ptr"}`` batched over the objects, the first two
    encoded when first read; conditioning entries also keep their output (``low_res_masks``, ``ious``,
    ``object_score_logits``)."""

    num_objects: int
    keep: int
    cond: dict[int, dict] = field(default_factory=dict)
    non_cond: dict[int, dict] = field(default_factory=dict)

    def as_output_dict(self) -> dict:
        return {"cond_frame_outputs": self.cond, "non_cond_frame_outputs": self.non_cond}

    def add_tracked(self, frame_idx: int, entry: dict) -> None:
        self.non_cond[frame_idx] = entry
        for t in [t for t in self.non_cond if t <= frame_idx - self.keep]:
            del self.non_cond[t]


class _MemoryEntry(dict):
    """A memory bank entry whose memory (``maskmem_features``, ``maskmem_pos_enc``) is encoded when something
    first reads it: a later frame's memory attention, or a caller. A frame no later frame reads never pays for
    SAM2's memory encoder: the key frames of a clip that has no other frames (training on key frames alone), the
    last frame of a clip."""

    def __init__(self, encode, **items):
        super().__init__(**items)
        self._encode = encode

    def __missing__(self, key):
        if key not in ("maskmem_features", "maskmem_pos_enc") or self._encode is None:
            raise KeyError(key)
        encode, self._encode = self._encode, None
        self["maskmem_features"], self["maskmem_pos_enc"] = encode()
        return self[key]


# A length larger than any video: SAM2 only uses it to cap how far back object pointers reach, and with frame
# indices below it that cap is the same as with the true length.
_UNBOUNDED = 1 << 30


class Sam2Decoder(nn.Module):
    """SAM2 image encoder + heads + memory (``self.sam2_model`` is the ``sam2`` package's ``SAM2Base``)."""

    def __init__(self, cfg: Sam2Config, device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        self.sam2_model = build_sam2_model(cfg, device)

    def _apply(self, fn, recurse: bool = True):
        # Casting to bf16/fp16 would break the prompt encoder's float32 coordinate encoding (a float32 grid times its
        # Gaussian matrix): keep it float32; its outputs are cast to the decoder's dtype.
        super()._apply(fn, recurse)
        self.sam2_model.sam_prompt_encoder.float()
        return self

    @property
    def image_size(self) -> int:
        return int(self.sam2_model.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.sam2_model.no_mem_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.sam2_model.no_mem_embed.device

    # ----------------------------------------------------------------------------------------- image side

    def preprocess(self, rgb: np.ndarray, mean: tuple | None = None, std: tuple | None = None) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32: resized to S x S ignoring the aspect ratio (as Sa2VA and
        SAM2's video predictor do), /255, then mean/std (the config's unless given: Sa2VA's training code uses
        the exact ImageNet values where its inference code uses bf16-rounded ones)."""
        return sam2_preprocess(rgb, self.image_size, self.cfg.resize, mean if mean is not None else self.cfg.pixel_mean,
                               std if std is not None else self.cfg.pixel_std)

    # On a CPU, the image encoder runs over at most this many frames at once: its activations at a training
    # batch of frames (16-frame clips, several per batch) are large enough that each op's fresh buffers cost more
    # in page faults than the op itself (bench/sam2_encode.py: 2-3x slower per frame at 128 frames than at 16).
    cpu_encode_chunk = 16

    def encode(self, pixel_values: torch.Tensor) -> Sam2Features:
        """(B, 3, S, S) -> the frames' features (trunk, FPN neck, ``conv_s0``/``conv_s1``); on a CPU in chunks of
        :attr:`cpu_encode_chunk` frames."""
        m = self.sam2_model
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        chunk = self.cpu_encode_chunk if pixel_values.device.type == "cpu" else 0
        if chunk and pixel_values.shape[0] > chunk:
            parts = [m.forward_image(x) for x in pixel_values.split(chunk)]
            backbone_out = {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k])
                            else [torch.cat(level) for level in zip(*(p[k] for p in parts))] for k in parts[0]}
        else:
            backbone_out = m.forward_image(pixel_values)
        _, feats, pos, sizes = m._prepare_backbone_features(backbone_out)
        # the FPN neck upsamples in float32 (SAM2 expects autocast around it): one dtype for what follows
        feats, pos = [x.to(self.dtype) for x in feats], [x.to(self.dtype) for x in pos]
        return Sam2Features(feats, pos, sizes, backbone_out["backbone_fpn"])

    # ----------------------------------------------------------------------------------------- heads

    def heads(self, pix_feat: torch.Tensor, high_res: list[torch.Tensor], language: torch.Tensor | None = None,
              points: tuple[torch.Tensor, torch.Tensor] | None = None, multimask: bool | None = None
              ) -> HeadOutput:
        """SAM2's prompt encoder + mask decoder on B prompts, with Sa2VA's language token and no object-score
        blanking of the masks.

        Args:
            pix_feat: (B, C, h, w) image embedding (with ``no_mem_embed`` added, or memory-conditioned).
            high_res: the two high-resolution levels, batch B.
            language: (B, C) projected ``[SEG]`` embeddings, appended as one sparse token each.
            points: ((B, P, 2) coordinates in the S x S frame, (B, P) labels: 1 positive, 0 negative, 2/3 box
                corners); None = no points (SAM2 pads with one label -1 point).
            multimask: three masks and the best by predicted IoU; default SAM2's rule (at most one point).
        """
        m = self.sam2_model
        b = pix_feat.shape[0]
        dev = pix_feat.device
        if points is None:
            coords = torch.zeros(b, 1, 2, device=dev)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=dev)
            num_pts = 0
        else:
            coords, labels = points[0].to(dev).float(), points[1].to(dev).int()
            num_pts = labels.shape[1]
        if multimask is None:
            multimask = m.multimask_output_in_sam and m.multimask_min_pt_num <= num_pts <= m.multimask_max_pt_num
        pe = m.sam_prompt_encoder
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
        if language is not None:
            sparse = torch.cat([sparse, language.to(sparse.dtype)[:, None, :]], dim=1)
        multimasks, ious, tokens, obj_scores = m.sam_mask_decoder(
            image_embeddings=pix_feat, image_pe=pe.get_dense_pe().to(pix_feat.dtype),
            sparse_prompt_embeddings=sparse.to(pix_feat.dtype),
            dense_prompt_embeddings=dense.to(pix_feat.dtype), multimask_output=multimask, repeat_image=False,
            high_res_features=high_res)
        multimasks = multimasks.float()
        rows = torch.arange(b, device=dev)
        best = ious.argmax(-1) if multimask else torch.zeros(b, dtype=torch.long, device=dev)
        low_res = multimasks[rows, best][:, None]
        token = tokens[rows, best] if tokens.shape[1] > 1 else tokens[:, 0]
        obj_ptr = m.obj_ptr_proj(token)
        if m.pred_obj_scores:
            present = (obj_scores > 0).to(obj_ptr.dtype)
            if m.soft_no_obj_ptr:
                present = obj_scores.sigmoid().to(obj_ptr.dtype)
            if m.fixed_no_obj_ptr:
                obj_ptr = present * obj_ptr
            obj_ptr = obj_ptr + (1 - present) * m.no_obj_ptr
        return HeadOutput(multimasks, ious, low_res, best, obj_ptr, obj_scores, sparse, tokens)

    def _unconditioned(self, features: Sam2Features) -> torch.Tensor:
        """An initial conditioning frame's embedding: level-2 features + ``no_mem_embed`` -> (B, C, h, w)."""
        m = self.sam2_model
        x = features.vision_feats[-1] + m.no_mem_embed
        h, w = features.feat_sizes[-1]
        return x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], h, w)

    def decode(self, features: Sam2Features, language: torch.Tensor | None = None,
               boxes: torch.Tensor | None = None, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               original_size: tuple[int, int] | None = None) -> HeadOutput:
        """Image mode: every prompt of one frame as an initial conditioning frame (no memory).

        ``language`` (N, C); ``boxes`` (M, 4) xyxy and ``points`` ((K, P, 2) xy, (K, P) labels 1/0), both in
        pixels of ``original_size`` (h, w). Outputs are concatenated in the order language, boxes, points; each
        kind is decoded in its own call (their token counts differ)."""
        outs = []
        if language is not None and len(language):
            n = len(language)
            f = features.repeat(n)
            outs.append(self.heads(self._unconditioned(f), f.high_res, language=language, multimask=True))
        if boxes is not None and len(boxes):
            if original_size is None:
                raise ValueError("boxes need the original image size")
            corners = self.to_input_frame(torch.as_tensor(boxes, dtype=torch.float32).view(-1, 2, 2), original_size)
            labels = torch.tensor([[2, 3]], dtype=torch.int32).expand(len(corners), 2)
            f = features.repeat(len(corners))
            outs.append(self.heads(self._unconditioned(f), f.high_res, points=(corners, labels)))
        if points is not None and len(points[0]):
            if original_size is None:
                raise ValueError("points need the original image size")
            coords = self.to_input_frame(torch.as_tensor(points[0], dtype=torch.float32), original_size)
            f = features.repeat(len(coords))
            outs.append(self.heads(self._unconditioned(f), f.high_res, points=(coords, torch.as_tensor(points[1]))))
        if not outs:
            raise ValueError("decode() needs at least one prompt")
        if len(outs) == 1:
            return outs[0]
        width = max(o.multimasks.shape[1] for o in outs)

        def pad(t: torch.Tensor) -> torch.Tensor:  # single-mask kinds padded to M columns by repetition
            return t if t.shape[1] == width else t.expand(-1, width, *t.shape[2:])

        return HeadOutput(*(torch.cat([pad(getattr(o, k)) if k in ("multimasks", "ious", "mask_tokens")
                                       else getattr(o, k) for o in outs])
                            if k != "sparse_embeddings" else [o.sparse_embeddings for o in outs]
                            for k in HeadOutput.__dataclass_fields__))

    def to_input_frame(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """xy pixel coordinates of the original (h, w) image -> the S x S frame (aspect ratio not kept)."""
        h, w = original_size
        scale = torch.tensor([self.image_size / w, self.image_size / h])
        return coords.float() * scale

    def postprocess(self, low_res: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(N, K, 4h, 4w) logits -> (N, K, H, W) float32 logits: bilinear to S x S, then to the original size
        (two steps, as SAM2's video predictor and Sa2VA do)."""
        s = self.image_size
        x = F.interpolate(low_res.float(), size=(s, s), mode="bilinear", align_corners=False)
        return F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------- video side

    def new_memory(self, num_objects: int) -> VideoMemory:
        """An empty memory bank for ``num_objects`` objects tracked together."""
        m = self.sam2_model
        keep = max(m.num_maskmem - 1, m.max_obj_ptrs_in_encoder - 1 if m.use_obj_ptrs_in_encoder else 0)
        return VideoMemory(num_objects, keep)

    def _encode_memory(self, features: Sam2Features, low_res_masks: torch.Tensor,
                       object_score_logits: torch.Tensor, from_points: bool) -> tuple[torch.Tensor, list]:
        m = self.sam2_model
        s = self.image_size
        high_res = F.interpolate(low_res_masks, size=(s, s), mode="bilinear", align_corners=False)
        feats, pos = m._encode_new_memory(features.vision_feats, features.feat_sizes, high_res.to(self.dtype),
                                          object_score_logits, is_mask_from_pts=from_points)
        return feats, pos

    def add_condition(self, memory: VideoMemory, frame_idx: int, features: Sam2Features,
                      language: torch.Tensor) -> FrameOutput:
        """Prompt frame ``frame_idx`` with one language embedding per object ((N, C), N = the memory's objects)
        as an initial conditioning frame, and store its memory. ``features`` are one frame's (batch 1) or one
        per object (batch N: objects of different videos tracked together, as training does). Sa2VA does this for
        each key frame before propagating."""
        n = memory.num_objects
        if language.shape[0] != n:
            raise ValueError(f"{language.shape[0]} language prompts for a memory of {n} objects")
        f = features.for_objects(n)
        out = self.heads(self._unconditioned(f), f.high_res, language=language, multimask=True)
        memory.cond[frame_idx] = _MemoryEntry(
            lambda: self._encode_memory(f, out.low_res_masks, out.object_score_logits, from_points=True),
            obj_ptr=out.obj_ptr, low_res_masks=out.low_res_masks, ious=out.ious,
            object_score_logits=out.object_score_logits)
        return FrameOutput(frame_idx, out.low_res_masks, out.ious, out.object_score_logits, True, out.multimasks)

    def track(self, memory: VideoMemory, frame_idx: int, features: Sam2Features,
              capture: dict | None = None) -> FrameOutput:
        """One frame without a prompt: memory attention over the bank, the heads (best of 3), then the frame's
        own memory. A conditioning frame returns its stored output. ``capture`` (a dict) receives the
        memory-conditioned embedding under ``"pix_feat_with_mem"`` (tests)."""
        if frame_idx in memory.cond:
            c = memory.cond[frame_idx]
            return FrameOutput(frame_idx, c["low_res_masks"], c["ious"], c["object_score_logits"], True)
        if not memory.cond:
            raise ValueError("track() needs at least one conditioning frame (add_condition first)")
        m = self.sam2_model
        f = features.for_objects(memory.num_objects)
        pix = m._prepare_memory_conditioned_features(
            frame_idx=frame_idx, is_init_cond_frame=False, current_vision_feats=f.vision_feats[-1:],
            current_vision_pos_embeds=f.vision_pos[-1:], feat_sizes=f.feat_sizes[-1:],
            output_dict=memory.as_output_dict(), num_frames=_UNBOUNDED)
        if capture is not None:
            capture["pix_feat_with_mem"] = pix
        out = self.heads(pix, f.high_res, multimask=m.multimask_output_in_sam and m.multimask_output_for_tracking)
        memory.add_tracked(frame_idx, _MemoryEntry(
            lambda: self._encode_memory(f, out.low_res_masks, out.object_score_logits, from_points=False),
            obj_ptr=out.obj_ptr))
        return FrameOutput(frame_idx, out.low_res_masks, out.ious, out.object_score_logits, False, out.multimasks)

    def propagate(self, memory: VideoMemory, frames: Iterable[tuple[int, torch.Tensor]]) -> Iterator[FrameOutput]:
        """Track through ``frames`` ((index, (1, 3, S, S) preprocessed pixels), in increasing index order),
        yielding each frame's output as soon as it is computed. Conditioning frames are not re-encoded."""
        for idx, pixels in frames:
            if idx in memory.cond:
                yield self.track(memory, idx, None)  # stored output
                continue
            yield self.track(memory, idx, self.encode(pixels))
