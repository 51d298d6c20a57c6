"""SAM as a promptable mask decoder, on the ``segment-anything`` package.

Image side: :meth:`SamDecoder.preprocess` (resize the longest side to ``image_size``, normalise, pad bottom/right
*after* normalising, as LISA does) and :meth:`SamDecoder.encode` (once per image). Prompt side:
:meth:`SamDecoder.decode` takes any mix of projected ``[SEG]`` embeddings (sparse prompt, with ``no_mask_embed``
as the dense one), boxes and points, and decodes every prompt of one image in a single mask-decoder call.
:meth:`SamDecoder.postprocess` brings low-resolution logits back to the original image size; masks are
``logits > 0``.

bf16: segment-anything's prompt encoder builds its positional grid in float32 and multiplies it by its Gaussian
matrix, which fails once that matrix is bf16. The prompt encoder therefore stays float32 whatever dtype the rest
of the model is cast to (see :meth:`SamDecoder._apply`); its outputs are cast to the mask decoder's dtype.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from ..config import SamConfig


def build_sam(cfg: SamConfig) -> Sam:
    """A segment-anything ``Sam`` with the given sizes (vit_h/l/b or tiny), randomly initialised."""
    emb = cfg.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.image_size,
            mlp_ratio=cfg.mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_num_heads,
            patch_size=cfg.vit_patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes), window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim),
        pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std),
    )


def sam_preprocess(image: np.ndarray, cfg: SamConfig, resize: ResizeLongestSide | None = None
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((3, S, S) normalised and padded float32, (h, w) resized size before padding).

    A function of the config alone, so data loaders can run it without holding the model."""
    resize = resize or ResizeLongestSide(cfg.image_size)
    resized = resize.apply_image(image)  # PIL bilinear, longest side -> S
    h, w = resized.shape[:2]
    # float32 numpy arithmetic (the same IEEE operations torch would do, without per-op dispatch: data loaders
    # call this for every training image)
    x = (resized.astype(np.float32) - np.asarray(cfg.pixel_mean, np.float32)) / np.asarray(cfg.pixel_std, np.float32)
    out = np.zeros((3, cfg.image_size, cfg.image_size), np.float32)
    out[:, :h, :w] = x.transpose(2, 0, 1)
    return torch.from_numpy(out), (int(h), int(w))


class SamDecoder(nn.Module):
    """SAM image encoder + prompt encoder + mask decoder (``self.sam`` is segment-anything's ``Sam``)."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        self.sam = build_sam(cfg)
        self.resize = ResizeLongestSide(cfg.image_size)

    def _apply(self, fn, recurse: bool = True):
        # Casting to bf16/fp16 would break the prompt encoder's float32 positional grid: keep it float32.
        super()._apply(fn, recurse)
        self.sam.prompt_encoder.float()
        return self

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    # ----------------------------------------------------------------------------------------- image side

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> ((3, S, S) normalised and padded float32, (h, w) resized size before padding)."""
        return sam_preprocess(image, self.cfg, self.resize)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> image embeddings (B, C, S/16, S/16)."""
        enc = self.sam.image_encoder
        return enc(pixel_values.to(enc.patch_embed.proj.weight.dtype))

    # ----------------------------------------------------------------------------------------- prompt side

    def decode(self, image_embeddings: torch.Tensor, text_embeds: torch.Tensor | None = None,
               boxes: torch.Tensor | None = None, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode every prompt of ONE image: one mask-decoder call per prompt kind present.

        Args:
            image_embeddings: (1, C, h, w) for the image.
            text_embeds: (N, C) projected ``[SEG]`` states; each becomes one sparse prompt token.
            boxes: (M, 4) xyxy in the preprocessed (resized) frame; each one prompt.
            points: ((K, P, 2) coordinates in the resized frame, (K, P) labels 1/0); each row one prompt.
        Returns:
            low-resolution mask logits (N + M + K, 1 or 3, 4h, 4w) and IoU predictions, in prompt order
            text, boxes, points.
        """
        pe = self.sam.prompt_encoder
        dtype = self.sam.mask_decoder.iou_token.weight.dtype
        sparse, dense = [], []
        if text_embeds is not None and len(text_embeds):
            n = text_embeds.shape[0]
            sparse.append(text_embeds.float()[:, None, :])
            dense.append(pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *pe.image_embedding_size))
        if boxes is not None and len(boxes):
            s, d = pe(points=None, boxes=boxes.float(), masks=None)
            sparse.append(s)
            dense.append(d)
        if points is not None and len(points[0]):
            s, d = pe(points=(points[0].float(), points[1]), boxes=None, masks=None)
            sparse.append(s)
            dense.append(d)
        if not sparse:
            raise ValueError("decode() needs at least one prompt")
        # Prompt kinds carry different token counts ([SEG] 1, box 2, points P (+1 pad)); padding them to one
        # length would change their masks, so each kind gets one decoder call of its own.
        low_res, iou = [], []
        for sp, de in zip(sparse, dense):
            m, q = self.sam.mask_decoder(
                image_embeddings=image_embeddings.to(dtype), image_pe=pe.get_dense_pe().to(dtype),
                sparse_prompt_embeddings=sp.to(dtype), dense_prompt_embeddings=de.to(dtype),
                multimask_output=multimask_output)
            low_res.append(m)
            iou.append(q)
        low_res, iou = torch.cat(low_res), torch.cat(iou)
        return low_res, iou

    def postprocess(self, low_res: torch.Tensor, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
        """(N, K, h, w) low-res logits -> (N, K, H, W) float32 logits at the original size (bilinear twice,
        cropping the padding in between; LISA upcasts to float32 first)."""
        return self.sam.postprocess_masks(low_res.float(), tuple(input_size), tuple(original_size))

    def box_to_input_frame(self, boxes_xyxy: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Boxes in original-image pixels -> the resized frame the prompt encoder expects."""
        return self.resize.apply_boxes_torch(boxes_xyxy.float(), tuple(original_size))

    def points_to_input_frame(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.resize.apply_coords_torch(coords.float(), tuple(original_size))
