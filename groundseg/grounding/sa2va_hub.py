"""Building and loading Sa2VA models: presets, our folder format (``family: sa2va``), and the official
InternVL-family HF release layout (``ByteDance/Sa2VA-{1B,4B,8B,26B}``: ``config.json`` with ``Sa2VAChatModel``,
keys ``vision_model.*``, ``mlp1.*``, ``language_model.*``, ``grounding_encoder.sam2_model.*``,
``text_hidden_fcs.*``).

The release's SAM2 is a vendored SAM 2.0 whose CXBlock layer scale is called ``g_weight`` (its conversion script
renamed ``gamma`` so that old transformers would not rewrite it); the ``sam2`` package calls it ``gamma``, and
that is the only renaming. Every release uses SAM2.0 Hiera-L (``configs/sam2/sam2_hiera_l.yaml``); a different
SAM2 (the tiny parity fixture) is passed as ``sam2=``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from ..config import SA2VA_PRESETS, Sa2VAConfig, Sam2Config
from .sa2va import Sa2VAModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
_OFFICIAL_SAM2 = "grounding_encoder.sam2_model."
_FUSER_SCALE = re.compile(r"^(grounding_encoder\.sam2_model\.memory_encoder\.fuser\.layers\.\d+)\.g_weight$")
_OURS_FUSER_SCALE = re.compile(r"^(grounding_encoder\.sam2_model\.memory_encoder\.fuser\.layers\.\d+)\.gamma$")
# Buffers older transformers saved and current code recomputes.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq)$")
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "hidden_act")
_LLM_DROP = ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map",
             "use_cache", "attn_implementation", "_attn_implementation")


def official_to_ours(key: str) -> str | None:
    """An official Sa2VA key -> ours (None for buffers we recompute)."""
    if _IGNORED.search(key):
        return None
    return _FUSER_SCALE.sub(r"\1.gamma", key)


def ours_to_official(key: str) -> str:
    return _OURS_FUSER_SCALE.sub(r"\1.g_weight", key)


def is_official_sa2va(raw_config: dict) -> bool:
    # --- Qwen2.5-VL backbone (sa2va_qwen.py): its releases say model_type sa2va_chat too
    from .sa2va_qwen import is_official_sa2va_qwen

    if is_official_sa2va_qwen(raw_config):
        return False
    # ---
    return "Sa2VAChatModel" in raw_config.get("architectures", []) or raw_config.get("model_type") == "sa2va_chat"


def config_from_official(raw: dict, sam2: Sam2Config | None = None) -> Sa2VAConfig:
    """A :class:`Sa2VAConfig` from an official ``config.json`` (``Sa2VAChatConfig``: ``vision_config``,
    ``llm_config``, ``template``, ``downsample_ratio``, ...)."""
    from ..hub import CheckpointError

    vc, lc = raw.get("vision_config"), raw.get("llm_config")
    if not isinstance(vc, dict) or not isinstance(lc, dict):
        raise CheckpointError("Sa2VA config.json: expected 'vision_config' and 'llm_config' objects (InternVL "
                              "layout); Qwen-VL-based releases are not supported by this version")
    arch = (lc.get("architectures") or ["?"])[0]
    if arch not in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
        raise CheckpointError(f"Sa2VA config.json: llm_config architecture {arch!r} is not supported (expected "
                              "Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM or Phi3ForCausalLM)")
    vision = {k: vc[k] for k in _VISION_KEYS if k in vc}
    if raw.get("force_image_size"):
        vision["image_size"] = raw["force_image_size"]
    llm = {k: v for k, v in lc.items() if k not in _LLM_DROP and v is not None}
    return Sa2VAConfig(vision=vision, llm=llm, sam2=sam2 or Sam2Config("configs/sam2/sam2_hiera_l.yaml"),
                       template=raw.get("template", "qwen_chat"), select_layer=raw.get("select_layer", -1),
                       downsample_ratio=raw.get("downsample_ratio", 0.5), ps_version=raw.get("ps_version", "v2"),
                       min_dynamic_patch=raw.get("min_dynamic_patch", 1),
                       max_dynamic_patch=raw.get("max_dynamic_patch", 12),
                       use_thumbnail=raw.get("use_thumbnail", True))


def build_sa2va(config, tokenizer, device: str | torch.device | None = None):
    """A randomly initialised model of either family (``device="meta"`` allocates nothing); an unset vocabulary
    size is the tokenizer's length."""
    llm = config.text_config() if _is_qwen(config) else config.llm
    if not llm.get("vocab_size"):
        if tokenizer is None:
            raise ValueError(f"preset {config.preset!r} takes its vocabulary size from its tokenizer")
        llm["vocab_size"] = len(tokenizer)
    if str(device) == "meta":
        return _empty(config, tokenizer).eval()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _model_class(config)(config, tokenizer, sam2_device=device)
    return model.eval()


def _is_qwen(config) -> bool:
    from .sa2va_qwen import Sa2VAQwenConfig  # --- Qwen2.5-VL backbone

    return isinstance(config, Sa2VAQwenConfig)


def _model_class(config):
    if _is_qwen(config):
        from .sa2va_qwen import Sa2VAQwenModel

        return Sa2VAQwenModel
    return Sa2VAModel


def _empty(config, tokenizer):
    """The model's structure without allocating its weights (filled by a strict load)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return _model_class(config)(config, tokenizer)


def load_official_sa2va(folder: str | os.PathLike, sam2: Sam2Config | None = None) -> Sa2VAModel:
    """Build from an official InternVL-family Sa2VA folder (``config.json``, safetensors, tokenizer files)."""
    from ..hub import CONFIG_NAME, load_strict, load_tokenizer, read_state_dict

    folder = Path(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    cfg = config_from_official(raw, sam2)
    tok = load_tokenizer(folder)
    state = {}
    for k, v in read_state_dict(folder).items():
        new = official_to_ours(k)
        if new is not None:
            state[new] = v.float() if v.is_floating_point() else v
    if "text_hidden_fcs.2.weight" in state:  # the prompt width is not in config.json
        cfg.out_dim = int(state["text_hidden_fcs.2.weight"].shape[0])
    model = _empty(cfg, tok)
    load_strict(model, state, str(folder))
    return model.eval()


def load_sa2va_pretrained(folder: str | os.PathLike) -> Sa2VAModel:
    """Our format: ``config.json`` with ``family: sa2va`` (and ``backbone: qwen2_5_vl`` for the Qwen2.5-VL
    backbone), ``model.safetensors``, tokenizer files."""
    from safetensors.torch import load_file

    from ..hub import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_strict, load_tokenizer

    folder = Path(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    config_cls = Sa2VAConfig
    if raw.get("backbone", "internvl") != "internvl":  # the Qwen2.5-VL backbone: same files, its own config
        from .sa2va_qwen import BACKBONE, Sa2VAQwenConfig

        if raw["backbone"] != BACKBONE:
            raise CheckpointError(f"{folder / CONFIG_NAME}: Sa2VA backbone {raw['backbone']!r} is not supported "
                                  f"(known: internvl, {BACKBONE})")
        config_cls = Sa2VAQwenConfig
    raw.pop("groundseg_version", None)
    try:
        cfg = config_cls.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}")
    model = _empty(cfg, load_tokenizer(folder))
    load_strict(model, load_file(str(weights)), str(weights))
    return model.eval()


def load_sa2va_preset(name: str, seed: int = 0) -> Sa2VAModel:
    """``sa2va-tiny`` (the shipped tokenizer, seeded random weights) or a released preset (its checkpoint)."""
    from ..hub import _download, load_tokenizer

    cfg = SA2VA_PRESETS[name]()
    # --- Qwen2.5-VL backbone
    from .sa2va_qwen import Sa2VAQwenConfig, load_official_sa2va_qwen

    if isinstance(cfg, Sa2VAQwenConfig) and cfg.checkpoint is not None:
        return load_official_sa2va_qwen(_download(cfg.checkpoint))
    # ---
    if cfg.checkpoint is not None:
        return load_official_sa2va(_download(cfg.checkpoint))
    if (ASSETS / name / "model.safetensors").is_file():
        return load_sa2va_pretrained(ASSETS / name)
    # a from-scratch preset whose trained weights this copy of groundseg lacks
    if name not in ("sa2va-tiny", "sa2va-qwen-tiny"):
        import sys

        print(f"note: {name}'s trained weights are not shipped in this version; using seeded random weights "
              f"(train them with: groundseg train --preset {name})", file=sys.stderr)
    torch.manual_seed(seed)
    return build_sa2va(cfg, load_tokenizer(ASSETS / name))


def load_sa2va(name_or_path: str | os.PathLike) -> Sa2VAModel | None:
    """A Sa2VA preset or folder (ours or official); None if ``name_or_path`` is neither."""
    name = str(name_or_path)
    if name in SA2VA_PRESETS:
        return load_sa2va_preset(name)
    path = Path(name)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        return None
    if raw.get("family") == "sa2va":
        return load_sa2va_pretrained(path)
    # --- Qwen2.5-VL backbone
    from .sa2va_qwen import is_official_sa2va_qwen, load_official_sa2va_qwen

    if is_official_sa2va_qwen(raw):
        return load_official_sa2va_qwen(path)
    # ---
    if is_official_sa2va(raw):
        return load_official_sa2va(path)
    return None


def official_layout(model: Sa2VAModel) -> dict[str, tuple[int, ...]]:
    """The official key -> shape table of a (meta-device) model, for comparing with released key lists."""
    return {ours_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- tiny tokenizer

SA2VA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "[SEG]", "<p>",
                 "</p>", "<vp>", "</vp>"]


def train_sa2va_tiny_tokenizer(vocab_size: int = 512):
    """The ``sa2va-tiny`` tokenizer: a byte-level BPE (so every string encodes) trained on the tiny presets'
    prompt corpus plus Sa2VA's prompts, with Qwen2's chat tokens, InternVL's image tokens and Sa2VA's five
    tokens as special tokens; pad ``<|endoftext|>``, eos ``<|im_end|>``, no BOS. Deterministic:
    ``python -m groundseg.grounding.sa2va_hub DIR`` rebuilds the shipped files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny_tokenizer import corpus

    lines = corpus() + [f"Please segment the {w}." for w in ("moving square", "circle", "object", "person")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SA2VA_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SA2VA_SPECIAL[3:], padding_side="right",
                                   model_max_length=8192)


def train_sa2va_shapes_tokenizer(vocab_size: int = 640):
    """The ``sa2va-shapes`` tokenizer: byte-level BPE on what the shapes world says (images and videos, in Sa2VA's
    prompt wording), Sa2VA's special tokens as above, every object name of the shapes world one token (as in
    shapes-demo: a from-scratch LLM then only has to copy one token into its answer) and ``[SEG]`` swallowing
    the space before it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..datasets.shapes import ShapesWorld
    from ..train.data import video_answer
    from .sa2va import segment_question
    from .tiny_tokenizer import shapes_corpus, shapes_name_phrases

    lines = shapes_corpus() + ["user\n", "assistant\n", "Sure, the segmentation result is [SEG]."]
    world = ShapesWorld(seed=9999)
    for i in range(300):
        for e in world.video(i).expressions:
            lines += [segment_question(e.text).replace("<image>", ""), video_answer(e.text)]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    special = [t for t in SA2VA_SPECIAL if t != "[SEG]"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[*special[3:],
                                                              AddedToken("[SEG]", lstrip=True, normalized=False)],
                                   padding_side="right", model_max_length=8192)
    fast.add_tokens([AddedToken(p, normalized=False) for p in shapes_name_phrases()])
    return fast


if __name__ == "__main__":
    import sys

    which = sys.argv[2] if len(sys.argv) > 2 else "sa2va-tiny"
    {"sa2va-tiny": train_sa2va_tiny_tokenizer, "sa2va-shapes": train_sa2va_shapes_tokenizer}[which]().save_pretrained(
        sys.argv[1])
