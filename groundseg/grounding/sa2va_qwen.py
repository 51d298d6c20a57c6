"""Sa2VA on Qwen2.5-VL (the ``ByteDance/Sa2VA-Qwen2_5-VL-3B/7B`` releases; reference/sa2va.md §1.1-1.5).

Parts (parameter names = the HF release's after its only renaming, ``g_weight`` there for SAM2's CXBlock layer
scale that the ``sam2`` package calls ``gamma``):

* ``model`` -- transformers' ``Qwen2_5_VLForConditionalGeneration`` as it is (its ViT, merger, language model,
  mrope and ``lm_head``); keys ``model.model.visual.*``, ``model.model.language_model.*``, ``model.lm_head.*``;
* ``grounding_encoder`` -- :class:`~groundseg.decoders.sam2.Sam2Decoder` (``grounding_encoder.sam2_model.*``);
* ``text_hidden_fcs`` -- Linear(H, H), ReLU, Linear(H, out_dim), Dropout(0), H = ``text_config.hidden_size``.

What the release's ``Sa2VAChatModelQwen.predict_forward`` does, and we do:

* Prompt: the Qwen2.5-VL chat template without its system turn (``tools/convert_to_hf.py`` strips it):
  ``<|im_start|>user\\n`` + one ``<|vision_start|><|image_pad|>...<|vision_end|>`` block per image or key frame
  (no separator between blocks, as the template renders consecutive image entries) + the question with
  ``<image>`` removed + ``<|im_end|>\\n<|im_start|>assistant\\n``. The release builds it with its processor's chat
  template; when an official folder ships a processor template that still carries Qwen's default system turn,
  that system text is kept (``system_prompt``), so the prompt stays the one the release builds.
* Images: ``qwen_vl_utils.fetch_image`` first rounds the image to multiples of 28 (PIL bicubic), then the
  Qwen2-VL image processor (transformers' own, PIL backend) resizes into ``[min_pixels, max_pixels]`` -- the
  release hard-codes 512 * 28^2 .. 2048 * 28^2 for images and video key frames alike -- and patchifies;
  ``<|image_pad|>`` is repeated ``t * h * w / merge^2`` times per image, as the HF processor does.
* The MLLM runs through transformers (``input_ids``, ``pixel_values``, ``image_grid_thw`` and
  ``mm_token_type_ids``, so mrope positions come from the model itself). Generation is greedy and ends at
  ``<|im_end|>`` or ``<|endoftext|>`` (Qwen2.5-VL's generation config); the answer text keeps special tokens
  and is stripped.
* The state that prompts SAM2 is the last-layer state AT each ``[SEG]`` position (the step whose input is
  ``[SEG]``), as for the InternVL family; the final generated token is never fed, so it has no state.
* SAM2: frames resized to S x S (aspect ratio not kept), one conditioning frame per image; for a video the
  key frames (the first 5, as released, or uniformly spaced) go to the MLLM as separate images, each prompt's
  first ``[SEG]`` embedding prompts SAM2 on every key frame, and SAM2's memory carries it through every frame.

Decisions where the release leaves room (documented, not verified against a real release):

* The released code has no teacher-forced path; ``answer=`` feeds the fixed answer in one forward (training's
  convention: states at ``input_ids == [SEG]``).
* Loading: the release's config.json does not say which SAM2 or pixel budget it uses (both are hard-coded in
  its code); an optional ``"groundseg"`` object in config.json may override fields of
  :class:`Sa2VAQwenConfig` (e.g. ``sam2``, ``min_pixels``) -- releases have none, so they get SAM2.0 Hiera-L.
* Training is not implemented for this backbone (no ``forward``/collator); use the InternVL-family Sa2VA.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import Sam2Config
from ..decoders.sam2 import Sam2Decoder
from ..io import InputError
from .sa2va import Grounding, Sa2VAModel, TrackFrame, read_key_frames, segment_question, track_objects
from .sa2va_hub import _empty
from .sa2va_hub import official_to_ours as _sam2_official_to_ours
from .sa2va_hub import ours_to_official
from .tokens import SEG, token_id

BACKBONE = "qwen2_5_vl"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
TEMPLATES = ("qwen2_5_vl_chat",)
# Sa2VAChatModelQwen: self.min_pixels / self.max_pixels, for an image and for every video key frame
RELEASE_MIN_PIXELS = 512 * 28 * 28
RELEASE_MAX_PIXELS = 2048 * 28 * 28
# qwen_vl_utils.fetch_image's defaults (MIN_PIXELS, MAX_PIXELS) for the first, rounding resize
FETCH_MIN_PIXELS = 4 * 28 * 28
FETCH_MAX_PIXELS = 16384 * 28 * 28
_ARCHITECTURES = ("Sa2VAChatModelQwen",)


# ------------------------------------------------------------------------------------------- config

@dataclass
class Sa2VAQwenConfig:
    """A Sa2VA model on Qwen2.5-VL: ``qwen`` -- keyword arguments of transformers' ``Qwen2_5_VLConfig``
    (``text_config``, ``vision_config``, the vision token ids, ...), ``sam2``, ``out_dim`` (SAM2's prompt
    width), ``template`` (``qwen2_5_vl_chat``: the chat template without a system turn unless
    ``system_prompt``), the pixel budget per image/key frame, the key-frame rule for videos."""

    family: str = "sa2va"
    backbone: str = BACKBONE
    preset: str | None = None
    qwen: dict[str, Any] = field(default_factory=dict)
    sam2: Sam2Config = field(default_factory=Sam2Config)
    out_dim: int = 256
    template: str = "qwen2_5_vl_chat"
    system_prompt: str = ""
    min_pixels: int = RELEASE_MIN_PIXELS
    max_pixels: int = RELEASE_MAX_PIXELS
    key_frames: str = "first"  # "first" (as released) or "uniform"
    num_key_frames: int = 5
    answer_template: str = "Sure, [SEG]."
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sa2VAQwenConfig":
        d = copy.deepcopy(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config.json: unknown field(s) {unknown} for a {BACKBONE} Sa2VA")
        if d.get("backbone", BACKBONE) != BACKBONE:
            raise ValueError(f"config.json: backbone {d['backbone']!r} is not {BACKBONE!r}")
        if isinstance(d.get("sam2"), dict):
            s = d["sam2"]
            for k in ("pixel_mean", "pixel_std"):
                if k in s:
                    s[k] = tuple(s[k])
            d["sam2"] = Sam2Config(**s)
        return cls(**d)

    def text_config(self) -> dict[str, Any]:
        """The dict holding the language model's keywords (``text_config``, or the top level in the flat
        layout of configs saved by transformers <= 4.49)."""
        return self.qwen["text_config"] if isinstance(self.qwen.get("text_config"), dict) else self.qwen

    def set_tied(self, tied: bool) -> None:
        self.qwen["tie_word_embeddings"] = tied
        self.text_config()["tie_word_embeddings"] = tied

    def qwen_config(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(**copy.deepcopy(self.qwen))


# ------------------------------------------------------------------------------------------- model

class Sa2VAQwenModel(nn.Module):
    """Sa2VA, Qwen2.5-VL layout (see the module docstring for the parts and the inference rules)."""

    family = "sa2va"
    backbone = BACKBONE
    supports_video = True

    def __init__(self, config: Sa2VAQwenConfig, tokenizer, sam2_device: str | torch.device | None = None):
        from transformers import Qwen2_5_VLForConditionalGeneration

        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        if config.template not in TEMPLATES:
            raise ValueError(f"unknown template {config.template!r}; expected one of {list(TEMPLATES)}")
        qc = config.qwen_config()
        self.model = Qwen2_5_VLForConditionalGeneration(qc)
        self.grounding_encoder = Sam2Decoder(config.sam2, device=sam2_device)
        h = qc.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, config.out_dim),
                                             nn.Dropout(0.0))
        sam_dim = self.grounding_encoder.sam2_model.sam_prompt_embed_dim
        if config.out_dim != sam_dim:
            raise ValueError(f"out_dim {config.out_dim} != SAM2 prompt dim {sam_dim}")
        vc = qc.vision_config
        self.patch_size, self.merge_size = int(vc.patch_size), int(vc.spatial_merge_size)
        self.temporal_patch_size = int(vc.temporal_patch_size)
        self._image_processor = None
        if tokenizer is None:  # structure only (meta-device layout checks)
            return
        self.seg_token_id = token_id(tokenizer, SEG)
        for name, tok in (("image_token_id", IMAGE_PAD), ("vision_start_token_id", VISION_START),
                          ("vision_end_token_id", VISION_END)):
            if token_id(tokenizer, tok) != getattr(qc, name):
                raise ValueError(f"the tokenizer's {tok} is id {token_id(tokenizer, tok)} but the config's {name} "
                                 f"is {getattr(qc, name)}")
        self.image_pad_id = qc.image_token_id
        self.stop_ids = [i for i in (tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT))
                         if isinstance(i, int) and i != tokenizer.unk_token_id]
        if not self.stop_ids:
            raise ValueError(f"the tokenizer has neither {IM_END} nor {END_OF_TEXT}: generation could not stop")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[-1]
        if len(tokenizer) > qc.text_config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocab_size is "
                             f"{qc.text_config.vocab_size}")

    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    # ------------------------------------------------------------------------------------------ vision

    @property
    def image_processor(self):
        """transformers' Qwen2-VL image processor (PIL backend) with this model's patching and pixel budget."""
        if self._image_processor is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self._image_processor = Qwen2VLImageProcessorPil(
                size={"shortest_edge": self.config.min_pixels, "longest_edge": self.config.max_pixels},
                patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size)
        return self._image_processor

    def pixel_values(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 images -> (patches (n, C * t * p * p), ``image_grid_thw`` (len(frames), 3)): each image
        rounded to multiples of patch * merge as ``qwen_vl_utils.fetch_image`` does (PIL bicubic), then the
        Qwen2-VL image processor (resize into the pixel budget, CLIP mean/std, patchify)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        images = []
        for rgb in frames:
            h, w = rgb.shape[:2]
            try:
                rh, rw = smart_resize(h, w, factor=factor, min_pixels=FETCH_MIN_PIXELS, max_pixels=FETCH_MAX_PIXELS)
            except ValueError as e:
                raise InputError(f"image of {w}x{h} pixels: {e}")
            images.append(Image.fromarray(rgb).convert("RGB").resize((rw, rh), Image.BICUBIC))
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokens_per_image(self, grid_thw: torch.Tensor) -> list[int]:
        return [int(g.prod()) // self.merge_size ** 2 for g in grid_thw]

    # ------------------------------------------------------------------------------------------ prompts

    def prompt_text(self, question: str, tokens_per_image: Sequence[int]) -> str:
        """The chat prompt: the user turn holds one vision block per image (``<|image_pad|>`` expanded), then the
        question without ``<image>``; no system turn unless ``config.system_prompt``."""
        vision = "".join(VISION_START + IMAGE_PAD * n + VISION_END for n in tokens_per_image)
        system = f"{IM_START}system\n{self.config.system_prompt}{IM_END}\n" if self.config.system_prompt else ""
        return f"{system}{IM_START}user\n{vision}{question.replace('<image>', '')}{IM_END}\n{IM_START}assistant\n"

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def mllm_inputs(self, ids: torch.Tensor, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict:
        """Keyword arguments of the transformers model for (1, L) ids: image tokens typed 1 in
        ``mm_token_type_ids``, so the model computes its 3D (mrope) positions."""
        ids = ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == self.image_pad_id).int(),
                "pixel_values": pixel_values.to(self.device), "image_grid_thw": grid_thw.to(self.device)}

    def ground(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, question: str, answer: str | None = None,
               max_new_tokens: int = 64) -> Grounding:
        """One question about one image (or a video's key frames, one grid row each) -> the answer and its
        ``[SEG]`` embeddings. ``answer`` fixes the answer (one forward); otherwise greedy generation until
        ``<|im_end|>``/``<|endoftext|>``. The states are the last layer's AT the ``[SEG]`` positions."""
        prompt = self.encode_text(self.prompt_text(question, self.tokens_per_image(grid_thw)))
        if answer is not None:
            new = self.encode_text(answer)
            ids = torch.tensor([prompt + new])
            out = self.model(**self.mllm_inputs(ids, pixel_values, grid_thw), output_hidden_states=True,
                             use_cache=False, logits_to_keep=1)
            states = out.hidden_states[-1][0]
            token_ids = ids[0].to(states.device)
            text = answer
        else:
            from transformers import GenerationConfig

            gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                       pad_token_id=self.pad_id, output_hidden_states=True,
                                       return_dict_in_generate=True)
            out = self.model.generate(**self.mllm_inputs(torch.tensor([prompt]), pixel_values, grid_thw),
                                      generation_config=gen_cfg)
            # step 0 holds the prompt's states, each later step one row: the state of every fed token; the final
            # generated token is never fed
            states = torch.cat([step[-1][0] for step in out.hidden_states])
            token_ids = out.sequences[0][:states.shape[0]].to(states.device)
            new = out.sequences[0][len(prompt):].tolist()
            text = self.tokenizer.decode(new, skip_special_tokens=False).strip()
        seg = states[token_ids == self.seg_token_id]
        fcs = self.text_hidden_fcs
        return Grounding(text, fcs(seg.to(fcs[0].weight.dtype)), seg, list(new))

    # ------------------------------------------------------------------------------------------ images

    segment = Sa2VAModel.segment  # the same loop; the MLLM side is the two methods below

    def _image_context(self, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixel_values([rgb])

    def _ground_image(self, context, question: str, answer: str | None, max_new_tokens: int) -> Grounding:
        pixels, grid = context
        return self.ground(pixels, grid, question, answer=answer, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------------------------------ videos

    @torch.no_grad()
    def track(self, video, prompts: Sequence[str], key_frames: str | None = None, num_key_frames: int | None = None,
              answer: str | None = None, max_new_tokens: int = 64, groundings: list | None = None
              ) -> Iterator[TrackFrame]:
        """Follow what each prompt names through a video, frame by frame (as :meth:`Sa2VAModel.track`): the key
        frames go to the MLLM as separate images, each prompt's first ``[SEG]`` prompts SAM2 on every key frame,
        then every frame is streamed once through SAM2's memory and yielded as soon as its masks exist. Object k
        is prompt k; a prompt whose answer has no ``[SEG]`` gets empty masks. ``groundings`` (a list) receives
        each prompt's :class:`~groundseg.grounding.sa2va.Grounding`."""
        from ..video import open_video

        source = open_video(video)
        keys, key_rgb = read_key_frames(source, key_frames or self.config.key_frames,
                                        num_key_frames or self.config.num_key_frames)
        pixels, grid = self.pixel_values([key_rgb[k] for k in keys])
        results = [self.ground(pixels, grid, segment_question(p),
                               answer=None if answer is None else answer.replace("{}", p.strip()),
                               max_new_tokens=max_new_tokens) for p in prompts]
        if groundings is not None:
            groundings.extend(results)
        del pixels
        yield from track_objects(self.grounding_encoder, source, keys, key_rgb, results)


# ------------------------------------------------------------------------------------------- building

# ------------------------------------------------------------------------------------------- official layout

# Keys of the transformers model as it is after 4.52 ("modern") and before ("legacy"), under Sa2VA's `model.`.
_MODERN_VISUAL, _MODERN_TEXT = "model.model.visual.", "model.model.language_model."
_LEGACY_VISUAL, _LEGACY_TEXT = "model.visual.", "model.model."
_DROP = {"architectures", "auto_map", "template", "model_type", "_name_or_path", "transformers_version", "torch_dtype",
         "dtype", "use_cache", "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
         "_commit_hash", "groundseg"}
_SYSTEM_TURN = re.compile(r"\{%-?\s*if loop\.first and message\['role'\] != 'system'\s*-?%\}\s*"
                          r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


def is_official_sa2va_qwen(raw: dict) -> bool:
    """A Qwen-family Sa2VA ``config.json``: architecture ``Sa2VAChatModelQwen``, a ``model_type`` naming both
    sa2va and qwen2_5_vl, or ``sa2va_chat`` (which both families use) with Qwen-VL's sub-configs instead of
    InternVL's ``llm_config``."""
    archs = [str(a) for a in raw.get("architectures") or []]
    if any(a in _ARCHITECTURES or (a.startswith("Sa2VA") and "Qwen" in a) for a in archs):
        return True
    mt = str(raw.get("model_type", "")).lower()
    if "qwen2_5_vl" in mt and ("sa2va" in mt or any("Sa2VA" in a for a in archs)):
        return True
    return mt == "sa2va_chat" and "llm_config" not in raw and ("text_config" in raw or "vision_config" in raw)


def official_to_ours(key: str) -> str | None:
    """An official key (HF release, either transformers layout, or xtuner's ``mllm.``-prefixed training layout)
    -> ours in the modern transformers layout (None for buffers we recompute); see :func:`to_installed_layout`."""
    key = key[len("mllm."):] if key.startswith("mllm.") else key
    key = _sam2_official_to_ours(key)
    if key is None:
        return None
    if key.startswith(_LEGACY_VISUAL):
        return _MODERN_VISUAL + key[len(_LEGACY_VISUAL):]
    if key.startswith(_LEGACY_TEXT) and not key.startswith((_MODERN_VISUAL, _MODERN_TEXT)):
        return _MODERN_TEXT + key[len(_LEGACY_TEXT):]
    return key


def to_installed_layout(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Modern-layout keys -> the layout of the installed transformers' ``Qwen2_5_VLForConditionalGeneration``
    (legacy before transformers 4.52: ``model.visual.*`` and ``model.model.*``)."""
    if any(k.startswith(_MODERN_TEXT) for k in model.state_dict()):
        return state
    out = {}
    for k, v in state.items():
        if k.startswith(_MODERN_VISUAL):
            k = _LEGACY_VISUAL + k[len(_MODERN_VISUAL):]
        elif k.startswith(_MODERN_TEXT):
            k = _LEGACY_TEXT + k[len(_MODERN_TEXT):]
        out[k] = v
    return out


def system_prompt_of(folder: Path, raw: dict) -> str:
    """The system turn the release's prompt carries: the default system text of the chat template that
    ``processor.apply_chat_template`` uses (``chat_template.jinja``/``chat_template.json``, else the tokenizer's,
    else config.json's ``template``); empty when that template has none (the release strips it) or no template
    is found."""
    templates = []
    if (folder / "chat_template.jinja").is_file():
        templates.append((folder / "chat_template.jinja").read_text())
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        f = folder / name
        if f.is_file():
            try:
                templates.append(json.loads(f.read_text()).get(key))
            except (json.JSONDecodeError, AttributeError):
                pass
    templates.append(raw.get("template"))
    for t in templates:
        if isinstance(t, str) and t.strip():
            m = _SYSTEM_TURN.search(t)
            return m.group(1) if m else ""
    return ""


def _clean(d: dict) -> dict:
    out = {k: v for k, v in d.items() if k not in _DROP and v is not None}
    for sub in ("text_config", "vision_config"):
        if isinstance(out.get(sub), dict):
            out[sub] = {k: v for k, v in out[sub].items() if k not in _DROP - {"model_type"} and v is not None}
    return out


def config_from_official_qwen(raw: dict, sam2: Sam2Config | None = None, system_prompt: str = ""
                              ) -> Sa2VAQwenConfig:
    """A :class:`Sa2VAQwenConfig` from an official ``config.json`` (``Sa2VAChatConfigQwen``, a
    ``Qwen2_5_VLConfig`` plus ``template``). SAM2 is the releases' Hiera-L unless ``sam2``; a ``groundseg``
    object in config.json overrides any field (releases have none)."""
    from ..hub import CheckpointError

    subtypes = [str((raw.get(s) or {}).get("model_type", "")) for s in ("text_config", "vision_config")]
    if any("qwen3" in t for t in subtypes + [str(raw.get("model_type", ""))]):
        raise CheckpointError("Sa2VA config.json: a Qwen3-VL-based release; only the Qwen2.5-VL (and InternVL) "
                              "Sa2VA families are supported by this version")
    if not isinstance(raw.get("vision_config"), dict):
        raise CheckpointError("Sa2VA-Qwen config.json: expected a 'vision_config' object (Qwen2.5-VL layout)")
    cfg = Sa2VAQwenConfig(qwen=_clean(raw), sam2=sam2 or Sam2Config("configs/sam2/sam2_hiera_l.yaml"),
                          system_prompt=system_prompt)
    extra = raw.get("groundseg")
    if extra:
        try:
            cfg = Sa2VAQwenConfig.from_dict({**cfg.to_dict(), **extra})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"Sa2VA-Qwen config.json 'groundseg': {e}")
    return cfg


def load_official_sa2va_qwen(folder: str | os.PathLike, sam2: Sam2Config | None = None) -> Sa2VAQwenModel:
    """Build from an official Qwen2.5-VL Sa2VA folder (``config.json``, safetensors, tokenizer files). Keys may
    be in either transformers layout or carry xtuner's ``mllm.`` prefix; loading is strict."""
    from ..hub import CONFIG_NAME, CheckpointError, load_strict, load_tokenizer, read_state_dict

    folder = Path(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    cfg = config_from_official_qwen(raw, sam2, system_prompt_of(folder, raw))
    tok = load_tokenizer(folder)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for k, v in read_state_dict(folder).items():
        new = official_to_ours(k)
        if new is None:
            continue
        if new in state:
            raise CheckpointError(f"{folder}: tensors {source[new]} and {k} are the same parameter ({new})")
        state[new], source[new] = (v.float() if v.is_floating_point() else v), k
    if "text_hidden_fcs.2.weight" in state:  # the prompt width is not in config.json
        cfg.out_dim = int(state["text_hidden_fcs.2.weight"].shape[0])
    # Sa2VA unties lm_head from the embeddings (convert_to_hf.py); a checkpoint without lm_head is a tied one.
    cfg.set_tied("model.lm_head.weight" not in state)
    text = cfg.text_config()
    if not text.get("vocab_size"):
        text["vocab_size"] = len(tok)
    try:
        model = _empty(cfg, tok)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: cannot build the model ({type(e).__name__}: "
                              f"{str(e)[:160]})")
    load_strict(model, to_installed_layout(state, model), str(folder))
    return model.eval()


def official_state_dict(model: Sa2VAQwenModel, layout: str = "modern") -> dict[str, torch.Tensor]:
    """The model's tensors under the release's names (``layout``: ``modern``, ``legacy`` -- transformers before
    4.52 -- or ``xtuner``, the training layout with ``mllm.`` before every key), e.g. to write a release-style
    folder."""
    out = {}
    for k, v in model.state_dict().items():
        k = ours_to_official(k)
        if layout == "legacy":
            if k.startswith(_MODERN_VISUAL):
                k = _LEGACY_VISUAL + k[len(_MODERN_VISUAL):]
            elif k.startswith(_MODERN_TEXT):
                k = _LEGACY_TEXT + k[len(_MODERN_TEXT):]
        elif layout == "xtuner":
            k = "mllm." + k
        elif layout != "modern":
            raise ValueError(f"layout {layout!r}: expected modern, legacy or xtuner")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------- tiny tokenizer

QWEN_TINY_SPECIAL = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, "[SEG]", "<p>",
                     "</p>", "<vp>", "</vp>"]


def train_sa2va_qwen_tiny_tokenizer(vocab_size: int = 512):
    """The ``sa2va-qwen-tiny`` tokenizer: a byte-level BPE (every string encodes) trained on the tiny presets'
    prompt corpus plus Sa2VA's prompts, with Qwen2.5-VL's chat and vision tokens and Sa2VA's five tokens as
    special tokens (ids 0..11 in :data:`QWEN_TINY_SPECIAL` order: ``<|vision_start|>`` 3, ``<|vision_end|>`` 4,
    ``<|image_pad|>`` 5, ``<|video_pad|>`` 6); pad ``<|endoftext|>``, eos ``<|im_end|>``, no BOS.
    Deterministic: ``python -m groundseg.grounding.sa2va_qwen DIR`` rebuilds the shipped files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny_tokenizer import corpus

    lines = corpus() + [f"Please segment the {w}." for w in ("moving square", "circle", "object", "person")]
    lines += ["user\n", "assistant\n", "system\n", "You are a helpful assistant."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_TINY_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=END_OF_TEXT,
                                   additional_special_tokens=QWEN_TINY_SPECIAL[1:2] + QWEN_TINY_SPECIAL[3:],
                                   padding_side="right", model_max_length=8192)


if __name__ == "__main__":
    import sys

    train_sa2va_qwen_tiny_tokenizer().save_pretrained(sys.argv[1])
