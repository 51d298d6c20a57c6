"""Sa2VA: an InternVL-style MLLM whose ``[SEG]`` tokens prompt SAM2, on images and videos (reference/sa2va.md).

Parts (parameter names = the InternVL-family HF release, so its tensors load by name; only SAM2's CXBlock layer
scale is ``gamma`` in the ``sam2`` package where the release says ``g_weight``):

* ``vision_model`` -- InternViT (:mod:`.internvit`); ``mlp1`` -- the projector after a 0.5 pixel shuffle
  (256 tokens per 448 x 448 tile);
* ``language_model`` -- a transformers causal LM (Qwen2 for Sa2VA-1B/4B);
* ``grounding_encoder`` -- :class:`~groundseg.decoders.sam2.Sam2Decoder` (``grounding_encoder.sam2_model.*``);
* ``text_hidden_fcs`` -- Linear(H, H), ReLU, Linear(H, out_dim), Dropout(0).

The state that prompts SAM2 is the last-layer state AT each ``[SEG]`` position (the step whose input is
``[SEG]``), not LISA's state before it. Images: InternVL dynamic tiling for the MLLM, one conditioning frame for
SAM2, best of 3 masks by predicted IoU. Videos: the key frames (the first 5, as released, or uniformly spaced) go
to the MLLM, each ``[SEG]`` embedding prompts SAM2 on every key frame, and SAM2's memory carries the objects
through every frame, streamed (:meth:`Sa2VAModel.track`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import Sa2VAConfig
from ..decoders.sam2 import Sam2Decoder, Sam2Features
from ..io import InputError, load_image
from ..result import Result
from .internvit import InternVisionModel, build_mlp1, pixel_shuffle
from .tokens import SEG, token_id
from .vlm import VisionLanguageModel

IMG_CONTEXT = "<IMG_CONTEXT>"
IMG_START, IMG_END = "<img>", "</img>"
SA2VA_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]

# name -> (user turn with {input}, stop words, answer suffix, turn separator). The release picks the template from
# config.json["template"]; training supervises each answer and its suffix, not the separator.
TEMPLATES = {
    "qwen_chat": ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", ("<|im_end|>", "<|endoftext|>"),
                  "<|im_end|>", "\n"),
    "internlm2_chat": ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", ("<|im_end|>",),
                       "<|im_end|>", "\n"),
    "phi3_chat": ("<|user|>\n{input}<|end|>\n<|assistant|>\n", ("<|end|>",), "<|end|>", "\n"),
}


def segment_question(expression: str) -> str:
    """Sa2VA's evaluation prompt for a referring expression (a question gets the 'respond with a mask' form)."""
    e = expression.strip()
    if "?" in e:
        return f"<image>\n {e} Please respond with a segmentation mask."
    return f"<image>\nPlease segment {e}."


def select_key_frames(num_frames: int, rule: str = "first", count: int = 5) -> list[int]:
    """Which frames the MLLM sees: ``first`` -- frames 0..count-1 (the release); ``uniform`` -- ``count``
    frames evenly spread from the first to the last (Sa2VA-i, competition entries)."""
    if num_frames < 1:
        raise InputError("the video has no frames")
    if count < 1:
        raise InputError(f"--num-key-frames {count}: expected at least 1")
    if rule == "first":
        return list(range(min(count, num_frames)))
    if rule == "uniform":
        return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, min(count, num_frames))})
    raise InputError(f"--key-frames {rule!r}: expected 'first' or 'uniform'")


# ------------------------------------------------------------------------------------------- preprocessing

def _grid_for(width: int, height: int, size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's tiling rule: the (cols, rows) grid with min..max tiles whose aspect ratio is closest to the
    image's; on a tie the larger grid wins when the image has more than half its pixels."""
    grids = sorted({(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if min_tiles <= c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * size * size * c * r:
            best = (c, r)
    return best


def image_tiles(rgb: np.ndarray, size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
                thumbnail: bool = True) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> InternVL dynamic tiles (each (size, size, 3)): the image resized (PIL bicubic) to the
    chosen grid and cut row-major, plus a whole-image thumbnail when there is more than one tile."""
    img = Image.fromarray(rgb)
    w, h = img.size
    cols, rows = _grid_for(w, h, size, min_tiles, max_tiles)
    big = np.asarray(img.resize((cols * size, rows * size), Image.BICUBIC))
    tiles = [big[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(np.asarray(img.resize((size, size), Image.BICUBIC)))
    return tiles


def normalize_tiles(tiles: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(size, size, 3) uint8 tiles -> (n, 3, size, size) float32, /255 then mean/std."""
    x = np.stack(tiles).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def frame_tile(rgb: np.ndarray, size: int = 448) -> np.ndarray:
    """A video key frame for the MLLM: one size x size tile (PIL bicubic, aspect ratio not kept)."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


# ------------------------------------------------------------------------------------------- outputs

@dataclass
class TrackFrame:
    """One frame of a tracked video: ``index`` in the video, ``rgb`` (H, W, 3), ``logits`` (N, H, W) float32
    mask logits per prompt (masks are ``logits > 0``), ``object_scores`` (N,) SAM2's object-presence logits,
    ``key_frame`` whether the MLLM saw it."""

    index: int
    rgb: np.ndarray
    logits: torch.Tensor
    object_scores: torch.Tensor
    key_frame: bool

    @property
    def masks(self) -> np.ndarray:
        return (self.logits > 0).numpy()


@dataclass
class Grounding:
    """What the MLLM said for one prompt: the answer ``text`` (and its ids), the (n_seg, H) last-layer states at
    the ``[SEG]`` positions and their (n_seg, out_dim) projections."""

    text: str
    seg_embeddings: torch.Tensor
    seg_hidden_states: torch.Tensor
    answer_ids: list[int]


class Sa2VAModel(nn.Module):
    """Sa2VA, InternVL2.5 layout (see the module docstring for the parts and their parameter names)."""

    family = "sa2va"
    supports_video = True

    def __init__(self, config: Sa2VAConfig, tokenizer, sam2_device: str | torch.device | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        v = config.vision
        self.vision_model = InternVisionModel(v)
        llm = dict(config.llm)
        lm_config = AutoConfig.for_model(llm.pop("model_type"), **llm)
        self.mlp1 = build_mlp1(v["hidden_size"], lm_config.hidden_size, config.downsample_ratio)
        self.language_model = AutoModelForCausalLM.from_config(lm_config)
        self.grounding_encoder = Sam2Decoder(config.sam2, device=sam2_device)
        h = lm_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, config.out_dim),
                                             nn.Dropout(0.0))
        sam_dim = self.grounding_encoder.sam2_model.sam_prompt_embed_dim
        if config.out_dim != sam_dim:
            raise ValueError(f"out_dim {config.out_dim} != SAM2 prompt dim {sam_dim}")
        self._cache_kw = _cache_kw(self.language_model)
        if config.template not in TEMPLATES:
            raise ValueError(f"unknown template {config.template!r}; expected one of {sorted(TEMPLATES)}")
        grid = v.get("image_size", 448) // v.get("patch_size", 14)
        self.tokens_per_tile = int(grid * config.downsample_ratio) ** 2  # 256 for 448 / 14 and 0.5
        if tokenizer is None:  # structure only (meta-device layout checks)
            return
        self.seg_token_id = token_id(tokenizer, SEG)
        self.img_context_id = token_id(tokenizer, IMG_CONTEXT)
        self.stop_words = TEMPLATES[config.template][1]
        self.stop_ids = [i for i in (tokenizer.convert_tokens_to_ids(s) for s in self.stop_words)
                         if i is not None and i != tokenizer.unk_token_id]
        # A stop word need not be one token: Sa2VA-4B uses phi3's "<|end|>" on a Qwen2.5 tokenizer. Generation
        # then ends at the tokenizer's EOS (or the token limit) and the answer is cut where the stop word's text
        # appears, as xtuner's stop-word criterion (which decodes) would have stopped it.
        self.generate_eos = self.stop_ids[0] if self.stop_ids else tokenizer.eos_token_id
        if self.generate_eos is None:
            raise ValueError(f"the tokenizer has none of the stop words {self.stop_words} of template "
                             f"{config.template} as a token, and no EOS token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.generate_eos
        if len(tokenizer) > lm_config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocab_size is {lm_config.vocab_size}")

    # borrowed: KV-cache greedy decoding that keeps every fed position's last-layer state
    run = VisionLanguageModel.run
    logits = VisionLanguageModel.logits
    _generate = VisionLanguageModel.generate

    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    # ------------------------------------------------------------------------------------------ vision

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, 448, 448) -> (n, 256, H) image tokens: InternViT, CLS dropped, pixel shuffle, ``mlp1``."""
        vm = self.vision_model
        trainable = any(p.requires_grad for p in vm.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(trainable):
            x = vm(pixel_values.to(device=self.device, dtype=vm.dtype), self.config.select_layer)[:, 1:]
        n, t, c = x.shape
        g = int(math.isqrt(t))
        x = pixel_shuffle(x.reshape(n, g, g, c), self.config.downsample_ratio, self.config.ps_version)
        x = x.reshape(n, -1, x.shape[-1])
        return self.mlp1(x.to(self.mlp1[0].weight.dtype))

    def image_pixel_values(self, rgb: np.ndarray) -> torch.Tensor:
        c = self.config
        size = c.vision.get("image_size", 448)
        return normalize_tiles(image_tiles(rgb, size, c.min_dynamic_patch, c.max_dynamic_patch, c.use_thumbnail),
                               c.mllm_mean, c.mllm_std)

    def frame_pixel_values(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        size = self.config.vision.get("image_size", 448)
        return normalize_tiles([frame_tile(f, size) for f in frames], self.config.mllm_mean, self.config.mllm_std)

    # ------------------------------------------------------------------------------------------ prompts

    def prompt_text(self, question: str, num_tiles: int, video: bool = False) -> str:
        """The chat prompt with ``<image>`` expanded: one ``<img>...</img>`` block of all tiles for an image,
        one block per key frame (newline-separated) for a video."""
        block = IMG_START + IMG_CONTEXT * self.tokens_per_tile + IMG_END
        image = "\n".join([block] * num_tiles) if video else IMG_START + IMG_CONTEXT * (
            self.tokens_per_tile * num_tiles) + IMG_END
        if "<image>" not in question:
            question = "<image>\n" + question
        return TEMPLATES[self.config.template][0].format(input=question.replace("<image>", image, 1))

    def training_ids(self, turns: Sequence[tuple[str, str]], num_tiles: int, video: bool = False
                     ) -> tuple[list[int], list[int]]:
        """A conversation for training -> (input ids, labels): each turn is the template's user part (the first
        question's ``<image>`` expanded), the answer + suffix (supervised) and the separator; labels are -100
        except on the answers, at the same positions as the ids (the loss shifts them)."""
        user, _, suffix, sep = TEMPLATES[self.config.template]
        ids: list[int] = []
        labels: list[int] = []
        for k, (question, answer) in enumerate(turns):
            text = self.prompt_text(question, num_tiles, video) if k == 0 else user.format(input=question)
            for piece, supervised in ((text, False), (answer + suffix, True), (sep, False)):
                enc = self.encode_text(piece)
                ids += enc
                labels += enc if supervised else [-100] * len(enc)
        return ids, labels

    def collate(self, samples: Sequence["Sa2VASample"]) -> "Sa2VABatch":
        """Training samples -> a right-padded :class:`Sa2VABatch` (see :class:`Sa2VACollator`)."""
        return self.collator()(samples)

    def collator(self) -> "Sa2VACollator":
        """A picklable collator (config and tokenizer only) for DataLoader workers."""
        return Sa2VACollator(self.config, self.tokenizer, self.tokens_per_tile, self.grounding_encoder.image_size)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, H) embeddings with the ``<IMG_CONTEXT>`` rows replaced, in row-major order, by
        ``image_tokens`` ((n, H): every context token of the batch, tile after tile)."""
        input_ids = input_ids.to(self.device)
        emb = self.language_model.get_input_embeddings()(input_ids)
        is_ctx = input_ids == self.img_context_id
        flat = image_tokens.reshape(-1, image_tokens.shape[-1])
        if int(is_ctx.sum()) != flat.shape[0]:
            raise ValueError(f"{int(is_ctx.sum())} <IMG_CONTEXT> tokens for {flat.shape[0]} image tokens")
        emb = emb.clone()
        emb[is_ctx] = flat.to(emb.dtype)
        return emb

    def ground(self, image_tokens: torch.Tensor, question: str, num_tiles: int, video: bool = False,
               answer: str | None = None, max_new_tokens: int = 64) -> Grounding:
        """One question about one image/video -> answer text and its ``[SEG]`` embeddings.

        ``image_tokens`` (num_tiles * 256, H). ``answer`` fixes the answer (teacher-forced, one forward);
        otherwise greedy KV-cache generation until a stop word. The states are those AT the ``[SEG]``
        positions."""
        ids = torch.tensor([self.encode_text(self.prompt_text(question, num_tiles, video))])
        if answer is not None:
            ids = torch.cat([ids, torch.tensor([self.encode_text(answer)])], 1)
            emb = self.embed(ids, image_tokens)
            states, _ = self.run(emb, torch.ones(ids.shape, dtype=torch.bool, device=self.device))
            seg = states[0, ids[0].to(self.device) == self.seg_token_id]
            text, new = answer, ids[0, -len(self.encode_text(answer)):].tolist() if answer else []
        else:
            emb = self.embed(ids, image_tokens)
            mask = torch.ones(ids.shape, dtype=torch.bool, device=self.device)
            gen = self._generate(emb, mask, ids.to(self.device), max_new_tokens, self.generate_eos, self.pad_id)
            new = gen.new_tokens[0]
            cut = self.stop_cut(new)
            new = new[:cut + 1] if cut is not None else new
            start = ids.shape[1]
            token_ids = gen.token_ids[0, :start + len(new)]
            fed = gen.hidden_states.shape[1]  # the final token is never fed, so it has no state
            pos = (token_ids[:fed] == self.seg_token_id).nonzero().flatten()
            seg = gen.hidden_states[0, pos]
            text = self.tokenizer.decode(new, skip_special_tokens=False)
        return Grounding(text, self.text_hidden_fcs(seg.to(self.text_hidden_fcs[0].weight.dtype)), seg, list(new))

    def stop_cut(self, new: Sequence[int]) -> int | None:
        """Index of the token that ends the answer: the first stop-word token, or the token whose text completes
        a stop word that is not one token, or the generation EOS; None when the answer never stopped."""
        ids = list(new)
        for i, t in enumerate(ids):
            if t in self.stop_ids or t == self.generate_eos:
                first = i
                break
        else:
            first = None
        multi = [w for w in self.stop_words if self.tokenizer.convert_tokens_to_ids(w) not in self.stop_ids]
        if multi:
            end = len(ids) if first is None else first
            for i in range(end):
                text = self.tokenizer.decode(ids[:i + 1], skip_special_tokens=False)
                if any(w in text for w in multi):
                    return i
        return first

    # ------------------------------------------------------------------------------------------ images

    @torch.no_grad()
    def segment(self, images, prompts: str | Sequence[str], max_new_tokens: int = 64,
                answer: str | None = None, boxes: Sequence | None = None) -> list[Result]:
        """Ground each (image, prompt) pair: one image with many prompts, one prompt over many images, or two
        lists that pair up. ``answer`` fixes the answer (``{}`` = the prompt). One mask per ``[SEG]``."""
        from .lisa import make_result, pair_prompts

        if boxes:
            raise InputError("the sa2va family takes no box prompts here; use a GLaMM model")
        image_list, pairs = pair_prompts(images, prompts)
        results: list[Result] = []
        sam = self.grounding_encoder
        cache: dict[int, tuple] = {}  # the current image only: its MLLM input and SAM2 features
        for i, p in pairs:
            if i not in cache:
                rgb = load_image(image_list[i])
                cache = {i: (rgb, self._image_context(rgb), sam.encode(sam.preprocess(rgb)[None]))}
            rgb, context, feats = cache[i]
            g = self._ground_image(context, segment_question(p), None if answer is None else
                                   answer.replace("{}", p.strip()), max_new_tokens)
            h, w = rgb.shape[:2]
            logits = torch.zeros(0, h, w)
            if len(g.seg_embeddings):
                out = sam.decode(feats, language=g.seg_embeddings)
                logits = sam.postprocess(out.low_res_masks, (h, w))[:, 0].float().cpu()
            results.append(make_result(g.text, logits, [None] * len(logits), ["seg"] * len(logits)))
        return results

    def _image_context(self, rgb: np.ndarray) -> tuple[int, torch.Tensor]:
        """What :meth:`segment` asks the MLLM about an image with: its dynamic tiles' count and image tokens."""
        tiles = self.image_pixel_values(rgb)
        return len(tiles), self.encode_tiles(tiles).flatten(0, 1)

    def _ground_image(self, context, question: str, answer: str | None, max_new_tokens: int) -> Grounding:
        n_tiles, tokens = context
        return self.ground(tokens, question, n_tiles, answer=answer, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------------------------------ videos

    @torch.no_grad()
    def track(self, video, prompts: Sequence[str], key_frames: str | None = None, num_key_frames: int | None = None,
              answer: str | None = None, max_new_tokens: int = 64, groundings: list | None = None
              ) -> Iterator[TrackFrame]:
        """Follow what each prompt names through a video, frame by frame.

        ``video``: a :class:`groundseg.video.FrameSource` (or anything :func:`groundseg.video.open_video`
        opens: an MP4 path, a folder of frames, a list of (H, W, 3) arrays). The key frames are read first
        (the MLLM sees them; each prompt's first ``[SEG]`` becomes a SAM2 prompt on each of them), then every
        frame is streamed once through SAM2's memory and yielded as soon as its masks exist, so memory does not
        grow with the video's length. Object k is prompt k; a prompt whose answer has no ``[SEG]`` gets empty
        masks. ``groundings`` (a list) receives each prompt's :class:`Grounding`."""
        from ..video import open_video

        source = open_video(video)
        keys, key_rgb = read_key_frames(source, key_frames or self.config.key_frames,
                                        num_key_frames or self.config.num_key_frames)
        tokens = self.encode_tiles(self.frame_pixel_values([key_rgb[k] for k in keys])).flatten(0, 1)
        results = [self.ground(tokens, segment_question(p), len(keys), video=True,
                               answer=None if answer is None else answer.replace("{}", p.strip()),
                               max_new_tokens=max_new_tokens) for p in prompts]
        if groundings is not None:
            groundings.extend(results)
        del tokens
        yield from track_objects(self.grounding_encoder, source, keys, key_rgb, results)


    # ------------------------------------------------------------------------------------------ training

    def forward(self, batch: "Sa2VABatch", point_generator: torch.Generator | None = None) -> dict:
        """Sa2VA's training losses: ``ce_loss`` + ``mask_bce_loss`` (x2.0) + ``mask_dice_loss`` (x0.5), summed in
        ``loss``. Each frame is a stand-alone conditioning frame (no memory), as in Sa2VA's training; each
        sample's objects are cycled to ``losses.objects_per_frame`` per frame; the mask losses are taken on
        ``num_points`` uncertainty-sampled points of the best-of-3 256 x 256 logits (every pixel when 0).
        Also returns ``seg_embeddings`` (n_seg, C), ``low_res_masks`` (rows, 1, 4h, 4w), ``ious``,
        ``language_embeddings`` (rows, C) and ``points`` (rows, P, 2) for inspection."""
        from ..train.losses import dice_loss, token_ce

        lc = self.config.losses
        dev = self.device
        tokens = self.encode_tiles(batch.pixel_values)
        emb = self.embed(batch.input_ids, tokens)
        states, _ = self.run(emb, batch.attention_mask.to(dev))
        labels = batch.labels.to(dev)
        supervised = labels[:, 1:] != -100
        ce = token_ce(self.logits(states), labels) * lc.ce_weight if bool(supervised.any()) \
            else states.sum() * 0.0
        is_seg = batch.input_ids.to(dev) == self.seg_token_id
        seg = self.text_hidden_fcs(states[is_seg].to(self.text_hidden_fcs[0].weight.dtype))
        out = {"ce_loss": ce, "seg_embeddings": seg, "seg_hidden_states": states[is_seg], "image_tokens": tokens}
        sam = self.grounding_encoder
        rows_lang, rows_gt, frame_of_row = [], [], []
        used, frame = 0, 0
        for gt in batch.gt_masks:
            t_i, n_i = gt.shape[:2]
            if n_i:
                pick = repeat_objects(n_i, lc.objects_per_frame)
                objs = seg[used:used + n_i]
                for t in range(t_i):
                    rows_lang.append(objs[pick])
                    rows_gt.append(gt[t, pick])
                    frame_of_row += [frame + t] * len(pick)
            used += n_i
            frame += t_i
        if used != len(seg):
            raise ValueError(f"the batch has {len(seg)} [SEG] tokens but its ground truth {used} objects")
        if lc.track_memory:
            return {**out, **self._tracking_losses(batch, seg, ce)}
        if not rows_lang:
            zero = seg.sum() * 0.0
            return {**out, "mask_bce_loss": zero, "mask_dice_loss": zero, "loss": ce + zero}
        frozen = not any(p.requires_grad for p in sam.sam2_model.image_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = [sam.encode(batch.sam_pixel_values[i:i + 1]) for i in sorted(set(frame_of_row))]
        by_frame = dict(zip(sorted(set(frame_of_row)), feats))
        out["sam_frames"] = torch.tensor(sorted(by_frame))
        out["sam_embeddings"] = torch.cat([_feature_map(f) for f in feats])
        lows, ious, langs = [], [], []
        start = 0
        for f_idx in sorted(set(frame_of_row)):
            n = frame_of_row.count(f_idx)
            lang = torch.cat(rows_lang)[start:start + n]
            f = by_frame[f_idx].repeat(n)
            head = sam.heads(sam._unconditioned(f), f.high_res, language=lang, multimask=True)
            lows.append(head.low_res_masks)
            ious.append(head.ious)
            langs.append(lang)
            start += n
        low = torch.cat(lows).float()
        size = low.shape[-2:]
        gt = torch.cat([F.interpolate(g.float()[:, None], size=size, mode="nearest") for g in rows_gt]).to(dev)
        if lc.num_points > 0:
            with torch.no_grad():
                points = uncertain_points(low.detach(), lc.num_points, lc.oversample_ratio,
                                          lc.importance_sample_ratio, point_generator)
            pred = point_sample(low, points)[:, 0]
            target = point_sample(gt, points.to(gt.dtype))[:, 0]
        else:
            points = None
            pred, target = low.flatten(1), gt.flatten(1)
        # On sampled points Sa2VA averages with avg_factor = count + 1e-4 (mmdet adds float32 eps on top);
        # on full maps it takes the plain mean.
        guard = 1e-4 + torch.finfo(torch.float32).eps if points is not None else 0.0
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="sum") / (pred.numel() + guard)
        dice = dice_loss(pred, target, scale=1.0, eps=lc.dice_eps).sum() / (len(pred) + guard)
        bce, dice = bce * lc.bce_weight, dice * lc.dice_weight
        return {**out, "mask_bce_loss": bce, "mask_dice_loss": dice, "loss": ce + bce + dice,
                "low_res_masks": low, "ious": torch.cat(ious), "language_embeddings": torch.cat(langs),
                "points": points, "point_preds": pred, "point_targets": target}


    def _tracking_losses(self, batch: "Sa2VABatch", seg: torch.Tensor, ce: torch.Tensor) -> dict:
        """``losses.track_memory``: SAM2's video path, trained. Samples with the same frame count are tracked
        together, one memory row per object (each row reads its own video's frames): the key frames (the
        config's rule) are prompted with the object's ``[SEG]`` embedding, then every other frame is tracked in
        order through the memory, as :meth:`track` does at inference. Every frame is supervised: BCE and Dice on
        all candidate masks (so whichever the IoU head picks is trained), MSE of the predicted IoUs against the
        real ones, and BCE of the object score against "visible in this frame"."""
        from ..train.losses import dice_loss

        lc = self.config.losses
        sam = self.grounding_encoder
        dev = self.device
        first_frame, first_seg = [], []
        f = o = 0
        for gt in batch.gt_masks:
            first_frame.append(f)
            first_seg.append(o)
            f += gt.shape[0]
            o += gt.shape[1]
        groups: dict[int, list[int]] = {}
        for i, gt in enumerate(batch.gt_masks):
            if gt.shape[1]:
                groups.setdefault(int(gt.shape[0]), []).append(i)
        bce_sum = dice_sum = iou_sum = obj_sum = seg.sum() * 0.0
        count = 0
        tracked = []  # per frame-count group: ({frame: FrameOutput}, (T, rows, 1, h, w) targets), for inspection
        maps, map_frames = [], []  # SAM2's lowest-level features of each frame used, and that frame's index
        pixels = batch.sam_pixel_values.to(dev, non_blocking=True)  # once: the batch's largest tensor
        for t_count, members in sorted(groups.items()):
            # rows: (sample, object); frame t of row r is sam_pixel_values[first_frame[sample] + t]
            rows = [(i, j) for i in members for j in range(batch.gt_masks[i].shape[1])]
            lang = seg[torch.tensor([first_seg[i] + j for i, j in rows], device=seg.device)]
            frame_ids = torch.tensor([first_frame[i] for i in members])[:, None] + torch.arange(t_count)
            feats = sam.encode(pixels[frame_ids.flatten().to(dev)])  # (members * T) frames, gathered on the device
            maps.append(_feature_map(feats))
            map_frames.append(frame_ids.flatten())
            member_pos = {i: k for k, i in enumerate(members)}
            row_pos = torch.tensor([member_pos[i] * t_count for i, _ in rows])
            keys = select_key_frames(t_count, self.config.key_frames, self.config.num_key_frames)
            memory = sam.new_memory(len(rows))
            outs = {}
            for t in keys:
                outs[t] = sam.add_condition(memory, t, feats.select(row_pos + t), lang)
            for t in range(t_count):
                if t not in outs:
                    outs[t] = sam.track(memory, t, feats.select(row_pos + t))
            gt = torch.stack([torch.stack([batch.gt_masks[i][t, j] for i, j in rows]) for t in range(t_count)])
            size = outs[0].multimasks.shape[-2:]
            gt = F.interpolate(gt.to(dev).flatten(0, 1)[:, None].float(), size=size, mode="nearest").view(
                t_count, len(rows), 1, *size)  # (T, rows, 1, h, w)
            tracked.append((outs, gt))
            for t in range(t_count):
                pred = outs[t].multimasks.float()  # (rows, M, h, w)
                target = gt[t].expand_as(pred)
                bce_sum = bce_sum + F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(
                    (-2, -1)).mean(1).sum()
                dice_sum = dice_sum + dice_loss(pred.flatten(0, 1), target.flatten(0, 1), scale=1.0,
                                                eps=lc.dice_eps).view(pred.shape[:2]).mean(1).sum()
                with torch.no_grad():
                    hard = pred > 0
                    inter = (hard & (target > 0)).sum((-2, -1)).float()
                    union = (hard | (target > 0)).sum((-2, -1)).float()
                    real_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
                iou_sum = iou_sum + F.mse_loss(outs[t].ious.float(), real_iou, reduction="none").mean(1).sum()
                visible = (gt[t].flatten(1) > 0).any(1).float()
                obj_sum = obj_sum + F.binary_cross_entropy_with_logits(
                    outs[t].object_score_logits.float()[:, 0], visible, reduction="sum")
                count += len(rows)
        features = {}
        if maps:
            features = {"sam_embeddings": torch.cat(maps), "sam_frames": torch.cat(map_frames)}
        if not count:
            zero = seg.sum() * 0.0
            return {"mask_bce_loss": zero, "mask_dice_loss": zero, "iou_loss": zero, "object_loss": zero,
                    "loss": ce + zero, **features}
        bce = bce_sum / count * lc.bce_weight
        dice = dice_sum / count * lc.dice_weight
        iou = iou_sum / count * lc.iou_weight
        obj = obj_sum / count * lc.object_weight
        return {"mask_bce_loss": bce, "mask_dice_loss": dice, "iou_loss": iou, "object_loss": obj,
                "loss": ce + bce + dice + iou + obj, "tracked": tracked, **features}


# ------------------------------------------------------------------------------------------- training

@dataclass
class Sa2VABatch:
    """A collated training batch. ``input_ids``/``labels``/``attention_mask`` (B, L), right-padded, with the
    ``<IMG_CONTEXT>`` runs expanded; ``pixel_values`` (n_tiles, 3, 448, 448): every sample's tiles/key frames in
    batch order; ``sam_pixel_values`` (n_frames, 3, S, S) every sample's frames in order; ``gt_masks`` one
    (T_i, n_i, H_i, W_i) tensor per sample (T_i frames, n_i objects = its ``[SEG]`` count, 0 for chat-only)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    sam_pixel_values: torch.Tensor
    gt_masks: list[torch.Tensor]
    # Shapes-world labels for the training-only attribute probes (train/probes.py), when every sample has them:
    # (n_frames, 3, g, g) uint8 colour/shape/size class per cell of SAM2's low-resolution mask grid, for every
    # frame of ``sam_pixel_values``; (n_tiles, 3, t, t) per image token of ``pixel_values`` (t x t tokens a tile);
    # (n_seg, 3) the classes of each [SEG]'s object.
    frame_attributes: torch.Tensor | None = None
    tile_attributes: torch.Tensor | None = None
    mask_attributes: torch.Tensor | None = None


@dataclass
class Sa2VASample:
    """One training sample: ``frames`` (one image, or a video's sampled frames, (H, W, 3) uint8), ``turns``
    (question, answer) pairs -- the first question holds ``<image>``, each ``[SEG]`` in the answers is one object --
    and ``gt_masks`` (frames, objects, H, W), objects in ``[SEG]`` order."""

    frames: list
    turns: list
    gt_masks: object
    video: bool = False
    attribute_maps: object = None  # (frames, 3, H, W) uint8 class maps (shapes world), for the attribute probes
    mask_attributes: object = None  # (objects, 3) classes of each [SEG]'s object


class Sa2VACollator:
    """Samples -> a right-padded :class:`Sa2VABatch` (pad id 0, label -100, as Sa2VA's collate): MLLM tiles per
    sample (dynamic tiles for an image, one tile per frame for a video), SAM2 inputs of every frame with the exact
    ImageNet statistics (Sa2VA's training code; its inference code rounds them to bf16). Takes
    :class:`Sa2VASample` or the trainer's :class:`~groundseg.train.data.TrainSample` (its ``frames`` make it a
    video). Holds the config and tokenizer only, so DataLoader workers can run it."""

    def __init__(self, config: Sa2VAConfig, tokenizer, tokens_per_tile: int, sam_image_size: int):
        self.config, self.tokenizer = config, tokenizer
        self.tokens_per_tile, self.sam_image_size = tokens_per_tile, sam_image_size

    encode_text = Sa2VAModel.encode_text
    prompt_text = Sa2VAModel.prompt_text
    training_ids = Sa2VAModel.training_ids
    image_pixel_values = Sa2VAModel.image_pixel_values
    frame_pixel_values = Sa2VAModel.frame_pixel_values

    def mllm_frames(self, num_frames: int) -> list[int]:
        """The frames of a video sample the MLLM sees: all of them (Sa2VA's training: each frame is its own
        conditioning frame), or, with ``losses.track_memory``, only the key frames, as :meth:`Sa2VAModel.track`
        shows it at inference (SAM2 still gets every frame; the others are reached through its memory)."""
        c = self.config
        if not c.losses.track_memory:
            return list(range(num_frames))
        return select_key_frames(num_frames, c.key_frames, c.num_key_frames)

    @staticmethod
    def as_sa2va(s) -> "Sa2VASample":
        if isinstance(s, Sa2VASample):
            return s
        masks = np.asarray(s.masks, dtype=bool)
        if s.frames is not None:  # (n, T, H, W) -> (T, n, H, W)
            return Sa2VASample(list(s.frames), list(s.conversations), masks.transpose(1, 0, 2, 3), video=True,
                               attribute_maps=s.frame_attribute_maps, mask_attributes=s.mask_attributes)
        amap = None if s.attribute_map is None else s.attribute_map[None]
        return Sa2VASample([s.image], list(s.conversations), masks[None], video=False, attribute_maps=amap,
                           mask_attributes=s.mask_attributes)

    def __call__(self, samples: Sequence) -> "Sa2VABatch":
        from ..config import IMAGENET_MEAN, IMAGENET_STD
        from ..decoders.sam2 import sam2_preprocess

        samples = [self.as_sa2va(s) for s in samples]
        rows, pixel_values, sam_pixels, gts, tile_frames = [], [], [], [], []
        for s in samples:
            if s.video:
                tile_frames.append(self.mllm_frames(len(s.frames)))
                tiles = self.frame_pixel_values([s.frames[k] for k in tile_frames[-1]])
            else:
                if len(s.frames) != 1:
                    raise ValueError("an image sample has exactly one frame")
                tiles = self.image_pixel_values(s.frames[0])
                tile_frames.append([0] * len(tiles))
            rows.append(self.training_ids(s.turns, len(tiles), s.video))
            pixel_values.append(tiles)
            sam_pixels += [sam2_preprocess(f, self.sam_image_size, self.config.sam2.resize, IMAGENET_MEAN,
                                           IMAGENET_STD) for f in s.frames]
            gt = torch.as_tensor(np.asarray(s.gt_masks)).bool()
            if gt.dim() != 4 or gt.shape[0] != len(s.frames):
                raise ValueError(f"gt_masks must be (frames, objects, H, W) with {len(s.frames)} frames, got "
                                 f"{tuple(gt.shape)}")
            gts.append(gt)
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention = torch.zeros(len(rows), length, dtype=torch.bool)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            labels[r, :len(lab)] = torch.tensor(lab)
            attention[r, :len(ids)] = True
        batch = Sa2VABatch(input_ids, labels, attention, torch.cat(pixel_values), torch.stack(sam_pixels), gts)
        if all(s.attribute_maps is not None and s.mask_attributes is not None for s in samples):
            self._attributes(batch, samples, tile_frames)
        return batch

    def _attributes(self, batch: "Sa2VABatch", samples: Sequence["Sa2VASample"], tile_frames: list[list[int]]
                    ) -> None:
        """The attribute probes' labels: SAM2's low-resolution mask grid (a quarter of its input side) for every
        frame, the image-token grid for every MLLM tile (a dynamically tiled image's tiles, thumbnail aside, are
        crops: they get labels only when the image is a single tile, else the batch gets none), and each
        [SEG]'s object."""
        from ..train.data import frame_grid_labels

        grid = self.sam_image_size // 4
        tgrid = math.isqrt(self.tokens_per_tile)
        frames, tiles = [], []
        for s, keep in zip(samples, tile_frames):
            amap = np.asarray(s.attribute_maps)
            frames.append(frame_grid_labels(amap, grid))
            if not s.video and len(keep) != 1:
                return
            tiles.append(frame_grid_labels(amap[keep], tgrid))
        batch.frame_attributes = torch.from_numpy(np.concatenate(frames).astype(np.uint8))
        batch.tile_attributes = torch.from_numpy(np.concatenate(tiles).astype(np.uint8))
        batch.mask_attributes = torch.from_numpy(np.concatenate(
            [np.asarray(s.mask_attributes, np.int64).reshape(-1, 3) for s in samples]))


def read_key_frames(source, rule: str, count: int) -> tuple[list[int], dict[int, np.ndarray]]:
    """The key frames of ``source`` (a :class:`groundseg.video.FrameSource`) by ``rule``: their indices and
    RGB arrays, read before streaming; an unreadable one is a one-line :class:`InputError`.

    A video whose header claims more frames than decode (``uniform`` then asks for frames past the real end) is
    counted exactly (``source.recount()``) and the key frames are chosen again over the frames it has."""
    keys = select_key_frames(source.num_frames, rule, count)
    key_rgb = dict(source.read(keys))
    missing = [k for k in keys if k not in key_rgb]
    if missing and source.recount() <= missing[0]:
        keys = select_key_frames(source.num_frames, rule, count)
        key_rgb = dict(source.read(keys))
        missing = [k for k in keys if k not in key_rgb]
    if missing:
        raise InputError(f"{source.name}: could not read key frame {missing[0]}")
    return keys, key_rgb


def track_objects(sam: Sam2Decoder, source, keys: list[int], key_rgb: dict[int, np.ndarray],
                  results: Sequence[Grounding]) -> Iterator[TrackFrame]:
    """SAM2's half of Sa2VA tracking, for any MLLM: each result's first ``[SEG]`` embedding prompts every key
    frame (``key_rgb``, emptied once encoded), then every frame of ``source`` is streamed once through the memory
    and yielded with its masks. Object k is result k; a result without ``[SEG]`` gets empty masks."""
    active = [k for k, g in enumerate(results) if len(g.seg_embeddings)]
    memory = sam.new_memory(len(active)) if active else None
    if active:
        language = torch.stack([results[k].seg_embeddings[0] for k in active])
        for idx in keys:
            sam.add_condition(memory, idx, sam.encode(sam.preprocess(key_rgb[idx])[None]), language)
    key_rgb.clear()
    n = len(results)
    for idx, rgb in source:
        h, w = rgb.shape[:2]
        logits = torch.full((n, h, w), -1e4)
        scores = torch.full((n,), -1e4)
        if active:
            feats = None if idx in memory.cond else sam.encode(sam.preprocess(rgb)[None])
            out = sam.track(memory, idx, feats)
            logits[active] = sam.postprocess(out.low_res_masks, (h, w))[:, 0].float().cpu()
            scores[active] = out.object_score_logits[:, 0].float().cpu()
        yield TrackFrame(idx, rgb, logits, scores, idx in keys)


def _feature_map(feats) -> torch.Tensor:
    """SAM2's lowest-resolution backbone features as a (B, C, h, w) map (before any memory conditioning)."""
    h, w = feats.feat_sizes[-1]
    x = feats.vision_feats[-1]  # (h * w, B, C)
    return x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], h, w)


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) maps at (N, P, 2) xy points in [0, 1] -> (N, C, P), bilinear (``grid_sample``)."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, align_corners=False)[..., 0]


def uncertain_points(logits: torch.Tensor, num_points: int, oversample: float, importance: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """PointRend/Mask2Former sampling on (N, 1, H, W) logits -> (N, num_points, 2): of ``oversample`` x
    ``num_points`` uniform candidates keep the ``importance`` share closest to the decision boundary
    (smallest |logit|), then add uniform points for the rest."""
    n = logits.shape[0]
    candidates = int(num_points * oversample)
    pts = torch.rand(n, candidates, 2, device=logits.device, generator=generator)
    closeness = -point_sample(logits, pts)[:, 0].abs()
    k = int(importance * num_points)
    top = closeness.topk(k, dim=1).indices
    picked = torch.gather(pts, 1, top[..., None].expand(-1, -1, 2))
    extra = num_points - k
    if extra > 0:
        picked = torch.cat([picked, torch.rand(n, extra, 2, device=logits.device, generator=generator)], 1)
    return picked


def repeat_objects(n: int, k: int) -> list[int]:
    """Which of n objects fill k training slots: cycled when n < k (o1, o2, o1, ...), the first k otherwise."""
    return [j % n for j in range(k)]


def _cache_kw(language_model) -> str:
    import inspect

    fwd = inspect.signature(language_model.get_decoder().forward).parameters
    return "cache" if "cache" in fwd else "past_key_values"
