"""Loading and saving weights: presets, our folder format, and the official LISA checkpoint layout.

Our format is a folder with ``config.json`` (``family``, ``preset``, every dimension), ``model.safetensors`` and the
tokenizer files. The official LISA layout (``xinlai/LISA-*``: ``config.json`` with ``LISAForCausalLM``, torch
``.bin`` shards or safetensors, keys ``model.*``/``lm_head.*``, no CLIP keys) loads directly: its SAM size is read
from the tensor shapes, CLIP comes from its own folder or hub id. Loading is strict: a missing, unexpected or
mis-shaped tensor is an error that names it. Pickled ``.bin`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .config import GlammConfig, LisaConfig, RegionConfig, SamConfig, VisionConfig, preset_config, PRESETS
from .grounding.glamm import GlammModel
from .grounding.lisa import LisaModel
from .io import InputError

ASSETS = Path(__file__).parent / "assets"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(InputError):
    """A checkpoint that does not match the model it should build (one line, names the tensors)."""


# ------------------------------------------------------------------------------------------ key mapping

# (official prefix, our prefix). CLIP is handled separately: transformers 5 dropped the `vision_model.` level.
_LISA_RULES = [
    ("model.vision_tower.vision_tower.vision_model.", "vlm.vision_tower."),
    ("model.mm_projector.", "vlm.projector."),
    ("model.visual_model.", "sam.sam."),
    ("model.text_hidden_fcs.", "seg_projector.text_hidden_fcs."),
    ("model.", "vlm.language_model.model."),
    ("lm_head.", "vlm.language_model.lm_head."),
]
# GLaMM (reference/glamm.md §2.2): LISA's layout with SAM under `grounding_encoder` and the region encoder.
_GLAMM_RULES = [
    ("model.vision_tower.vision_tower.vision_model.", "vlm.vision_tower."),
    ("model.mm_projector.", "vlm.projector."),
    ("model.grounding_encoder.", "sam.sam."),
    ("model.region_encoder.", "region_encoder."),
    ("model.text_hidden_fcs.", "seg_projector.text_hidden_fcs."),
    ("model.", "vlm.language_model.model."),
    ("lm_head.", "vlm.language_model.lm_head."),
]
# family -> (config class, model class)
FAMILIES = {"lisa": (LisaConfig, LisaModel), "glamm": (GlammConfig, GlammModel)}
# Presets built from scratch that share another preset's shipped tokenizer.
_TOKENIZER_ASSETS = {"glamm-tiny": "lisa-tiny", "glamm-shapes": "shapes-demo"}


def preset_tokenizer_dir(name: str) -> Path:
    """Where a from-scratch preset's shipped tokenizer lives."""
    return ASSETS / _TOKENIZER_ASSETS.get(name, name)


def _family(name: str):
    if name not in FAMILIES:
        raise CheckpointError(f"family {name!r} is not supported by this version of groundseg "
                              f"(known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


# Buffers that old transformers saved and current code recomputes.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def _clip_prefix(model: LisaModel) -> str:
    """Our CLIP key prefix: ``vlm.vision_tower.`` (transformers 5) or ``vlm.vision_tower.vision_model.`` (4.x)."""
    has_level = any(k.startswith("vision_model.") for k in model.vlm.vision_tower.state_dict())
    return "vlm.vision_tower.vision_model." if has_level else "vlm.vision_tower."


def official_to_ours(key: str, clip_prefix: str = "vlm.vision_tower.", rules=None) -> str | None:
    """Map an official LISA key (GLaMM with ``rules=_GLAMM_RULES``) to ours (None for buffers we recompute)."""
    if _IGNORED.search(key):
        return None
    for old, new in rules or _LISA_RULES:
        if key.startswith(old):
            if new == "vlm.vision_tower.":
                new = clip_prefix
            return new + key[len(old):]
    return key


def ours_to_official(key: str, clip_prefix: str = "vlm.vision_tower.") -> str:
    """Inverse of :func:`official_to_ours` (for the keys we have)."""
    if key.startswith(clip_prefix):
        return "model.vision_tower.vision_tower.vision_model." + key[len(clip_prefix):]
    for old, new in _LISA_RULES[1:]:
        if key.startswith(new):
            return old + key[len(new):]
    return key


# ------------------------------------------------------------------------------------------ reading tensors

def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: ``model.safetensors``/``*.safetensors`` shards or ``pytorch_model*.bin``
    (loaded with ``weights_only=True`` and memory-mapped)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(p for p in folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
    out = {}
    for f in bins:
        try:
            out.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # a pickle with anything but tensors and containers is refused here
            raise CheckpointError(f"{f}: not a plain tensor checkpoint ({type(e).__name__}: {str(e)[:120]})")
    return out


def tied_duplicates(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys of output embeddings tied to the input embeddings (a transformers model whose config
    says ``tie_word_embeddings``), mapped to the input key: ``...lm_head.weight`` -> ``...embed_tokens.weight``.
    They are not saved and are tied again on load. Read off the configs, so it holds on the meta device too."""
    names = {id(m): n for n, m in model.named_modules()}
    dup: dict[str, str] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if not (hasattr(m, "get_output_embeddings") and getattr(cfg, "tie_word_embeddings", False)):
            continue
        out, inp = m.get_output_embeddings(), m.get_input_embeddings()
        if out is not None and inp is not None and id(out) in names and id(inp) in names:
            prefix = lambda mod: f"{names[id(mod)]}." if names[id(mod)] else ""
            dup[f"{prefix(out)}weight"] = f"{prefix(inp)}weight"
    return dup


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` that fails with one line naming missing, unexpected and mis-shaped tensors.
    Tied tensors (see :func:`tied_duplicates`) may be absent; they are tied again after loading."""
    dup = tied_duplicates(model)
    state = dict(state)
    for k, src in dup.items():
        if k not in state and src in state:
            state[k] = state[src]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    for name, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            problems.append(f"{len(keys)} {name} tensor(s): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} vs "
                        f"model {tuple(own[k].shape)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    if dup:  # `assign` put separate parameters in place of the tied one
        for m in model.modules():
            if m is not model and hasattr(m, "tie_weights") and hasattr(m, "get_input_embeddings"):
                m.tie_weights()
    if isinstance(model, LisaModel):
        model.sam.sam.prompt_encoder.float()  # `assign` keeps checkpoint dtypes; see decoders/sam.py


def _empty_model(config: LisaConfig, tokenizer) -> LisaModel:
    """Parameters on the meta device (no allocation, no random init), buffers real: rotary frequencies,
    position ids and SAM's pixel statistics are computed, not stored, so they must be built for real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return _family(config.family)[1](config, tokenizer)


# ------------------------------------------------------------------------------------------ tokenizers

def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:160]})")


# ------------------------------------------------------------------------------------------ building

def build_model(config: LisaConfig, tokenizer, device: str | torch.device | None = None) -> LisaModel:
    """A randomly initialised model for ``config`` (``device="meta"`` allocates nothing)."""
    model_cls = _family(config.family)[1]
    if not config.llm.get("vocab_size"):
        if tokenizer is None:
            raise ValueError(f"preset {config.preset!r} takes its vocabulary size from its tokenizer")
        config.llm["vocab_size"] = len(tokenizer)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = model_cls(config, tokenizer)
    return model.eval()


def _preset_model(name: str, seed: int = 0) -> LisaModel:
    cfg = preset_config(name)
    if cfg.checkpoint is None:
        if (ASSETS / name / CONFIG_NAME).is_file():  # a trained preset shipped in our format
            return load_pretrained(ASSETS / name)
        # built from scratch: the shipped tokenizer and seeded random weights, the same on every call
        torch.manual_seed(seed)
        return build_model(cfg, load_tokenizer(preset_tokenizer_dir(name)))
    folder = _download(cfg.checkpoint)
    vision = _download(cfg.vision.pretrained) if cfg.vision.pretrained else None
    if cfg.family == "glamm":
        return load_official_glamm(folder, vision_tower=vision)
    return load_official_lisa(folder, vision_tower=vision)


def _download(repo_id: str) -> Path:
    local = Path(repo_id)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as e:
        raise CheckpointError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
                              "download it on a machine with network and pass the local folder instead")


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_model(name_or_path: str | os.PathLike | None = None, device: str | None = None,
               dtype: torch.dtype | None = None, vision_tower: str | os.PathLike | None = None) -> LisaModel:
    """Load a preset (``shapes-demo``, ``lisa-tiny``, ``lisa-7b``, ``lisa-13b``), a folder in our format, or an
    official LISA checkpoint folder (CLIP from ``vision_tower``, else from the checkpoint's config). ``None`` = the
    default model. Raises :class:`CheckpointError` / :class:`InputError` with one line on bad input."""
    name = str(name_or_path) if name_or_path is not None else default_model()
    path = Path(name)
    from .grounding.sa2va_hub import load_sa2va  # Sa2VA presets and folders (ours or the official layout)

    sa2va = None if name in PRESETS else load_sa2va(name)
    if sa2va is not None:
        model = sa2va
    elif name in PRESETS:
        model = _preset_model(name)
    elif path.is_dir():
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: not a checkpoint folder (no {CONFIG_NAME})")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})")
        if "family" in raw:
            model = load_pretrained(path)
        elif "GLaMMForCausalLM" in raw.get("architectures", []):  # before LISA: it has train_mask_decoder too
            model = load_official_glamm(path, vision_tower=vision_tower)
        elif "LISAForCausalLM" in raw.get("architectures", []) or raw.get("train_mask_decoder"):
            model = load_official_lisa(path, vision_tower=vision_tower)
        else:
            raise CheckpointError(f"{cfg_file}: neither a groundseg config (no 'family') nor an official LISA "
                                  "config (architectures LISAForCausalLM)")
    elif path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
    else:
        from .config import SA2VA_PRESETS

        known = ", ".join(sorted([*PRESETS, *SA2VA_PRESETS]))
        raise CheckpointError(f"unknown model {name!r}: not a preset ({known}) "
                              "and no such folder")
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def default_model() -> str:
    """The model used when none is named: the shipped ``shapes-demo`` (trained by ``groundseg train --preset
    shapes-demo``), or ``lisa-tiny`` in a checkout whose shapes-demo weights are missing."""
    return "shapes-demo" if (ASSETS / "shapes-demo" / WEIGHTS_NAME).is_file() else "lisa-tiny"


# ------------------------------------------------------------------------------------------ our format

def load_pretrained(folder: str | os.PathLike) -> LisaModel:
    folder = Path(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    raw.pop("groundseg_version", None)
    try:
        cfg = _family(raw.get("family", "lisa"))[0].from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}")
    tok = load_tokenizer(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}")
    model = _empty_model(cfg, tok)
    load_strict(model, _safetensors(weights), str(weights))
    return model.eval()


def save_pretrained(model: LisaModel, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` + tokenizer files; atomic (a temp folder renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        cfg = {"groundseg_version": __version__, **model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        dup = tied_duplicates(model)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in dup}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "family": model.family})
        model.tokenizer.save_pretrained(str(tmp))
        # transformers 5 writes only tokenizer.json; the SentencePiece model is what reproduces the official
        # checkpoints' 4.31 prompt ids (grounding/conversation.py), so it travels too.
        sp_model = getattr(model.tokenizer, "vocab_file", None)
        if sp_model and str(sp_model).endswith(".model") and os.path.isfile(sp_model) \
                and not (tmp / "tokenizer.model").exists():
            shutil.copy(sp_model, tmp / "tokenizer.model")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ------------------------------------------------------------------------------------------ official LISA

def sam_config_from_state(state: dict[str, torch.Tensor], prefix: str = "model.visual_model.") -> SamConfig:
    """Read a SAM config off the tensor shapes of a checkpoint (LISA hard-codes ViT-H; the parity fixture is
    tiny)."""
    def t(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state:
            raise CheckpointError(f"checkpoint has no SAM tensor {key}")
        return state[key]

    embed = t("image_encoder.patch_embed.proj.weight").shape[0]
    patch = t("image_encoder.patch_embed.proj.weight").shape[-1]
    grid = t("image_encoder.pos_embed").shape[1]
    blocks = sorted({int(m.group(1)) for k in state
                     if (m := re.match(re.escape(prefix) + r"image_encoder\.blocks\.(\d+)\.", k))})
    rel = {i: t(f"image_encoder.blocks.{i}.attn.rel_pos_h").shape for i in blocks}
    global_idx = tuple(i for i in blocks if rel[i][0] == 2 * grid - 1)
    windowed = [i for i in blocks if i not in global_idx]
    window = (rel[windowed[0]][0] + 1) // 2 if windowed else 14
    head_dim = rel[blocks[0]][1]
    dec_layers = {int(m.group(1)) for k in state
                  if (m := re.match(re.escape(prefix) + r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    prompt_dim = t("image_encoder.neck.0.weight").shape[0]
    return SamConfig(
        encoder_embed_dim=embed, encoder_depth=len(blocks), encoder_num_heads=embed // head_dim,
        encoder_global_attn_indexes=global_idx, image_size=grid * patch, vit_patch_size=patch, window_size=window,
        mlp_ratio=t("image_encoder.blocks.0.mlp.lin1.weight").shape[0] / embed, prompt_embed_dim=prompt_dim,
        mask_in_chans=t("prompt_encoder.mask_downscaling.3.weight").shape[0],
        decoder_depth=len(dec_layers),
        decoder_mlp_dim=t("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        decoder_num_heads=8,  # not visible in shapes; 8 in every released SAM
        num_multimask_outputs=t("mask_decoder.mask_tokens.weight").shape[0] - 1,
        iou_head_depth=len({k for k in state if k.startswith(prefix + "mask_decoder.iou_prediction_head.layers.")
                            and k.endswith(".weight")}),
        iou_head_hidden_dim=t("mask_decoder.iou_prediction_head.layers.0.weight").shape[0])


def lisa_config_from_official(hf_config: dict, state: dict[str, torch.Tensor], clip_config: dict) -> LisaConfig:
    """A :class:`LisaConfig` from an official ``config.json``, its tensors and the CLIP tower's config."""
    c = hf_config
    llm = dict(model_type="llama", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
               intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
               num_attention_heads=c["num_attention_heads"],
               num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
               rms_norm_eps=c.get("rms_norm_eps", 1e-6), max_position_embeddings=c.get("max_position_embeddings", 2048),
               hidden_act=c.get("hidden_act", "silu"), tie_word_embeddings=False,
               bos_token_id=c.get("bos_token_id", 1), eos_token_id=c.get("eos_token_id", 2),
               pad_token_id=c.get("pad_token_id", 0))
    if c.get("rope_theta"):
        llm["rope_theta"] = c["rope_theta"]
    clip_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")
    vision = VisionConfig(clip={k: clip_config[k] for k in clip_keys if k in clip_config},
                          select_layer=c.get("mm_vision_select_layer", -2),
                          select_feature=c.get("mm_vision_select_feature", "patch"),
                          pretrained=c.get("mm_vision_tower") or c.get("vision_tower"))
    projector = c.get("mm_projector_type", "linear")
    return LisaConfig(vision=vision, projector=projector, llm=llm, sam=sam_config_from_state(state),
                      out_dim=c.get("out_dim", 256), use_im_start_end=c.get("mm_use_im_start_end", True),
                      tokenization="lisa")


def load_official_lisa(folder: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> LisaModel:
    """Build from an official LISA checkpoint folder; CLIP from ``vision_tower`` (a folder with a transformers
    CLIP model, or a hub id), defaulting to the checkpoint's ``mm_vision_tower``."""
    return _load_official(folder, vision_tower, lisa_config_from_official, _LISA_RULES)


def _load_official(folder: str | os.PathLike, vision_tower, make_config, rules) -> LisaModel:
    """The LLaVA-style official layouts (LISA, GLaMM): ``make_config(hf_config, state, clip_config)`` gives our
    config, ``rules`` map the keys; CLIP comes from its own folder or hub id (merge scripts drop it)."""
    from transformers import CLIPVisionModel

    folder = Path(folder)
    hf_config = json.loads((folder / CONFIG_NAME).read_text())
    state = read_state_dict(folder)
    clip_src = vision_tower or hf_config.get("mm_vision_tower") or hf_config.get("vision_tower")
    if clip_src is None:
        raise CheckpointError(f"{folder}: no vision tower named; pass vision_tower=")
    clip_dir = Path(clip_src) if Path(clip_src).is_dir() else _download(str(clip_src))
    try:
        clip = CLIPVisionModel.from_pretrained(str(clip_dir))
    except Exception as e:
        raise CheckpointError(f"{clip_dir}: cannot load a CLIP vision model ({type(e).__name__}: {str(e)[:120]})")
    cfg = make_config(hf_config, state, clip.config.to_dict())
    cfg.vision.pretrained = str(clip_src)
    tok = load_tokenizer(folder)
    model = _empty_model(cfg, tok)
    clip_prefix = _clip_prefix(model)
    ours: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if "vision_tower" in k:  # merge scripts drop them; a full state dict carries them: CLIP comes from clip_dir
            continue
        new = official_to_ours(k, clip_prefix, rules)
        if new is not None:
            ours[new] = v
    for k, v in clip.state_dict().items():
        if not _IGNORED.search(k):
            ours[clip_prefix + k.removeprefix("vision_model.")] = v
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in ours.items()}, str(folder))
    return model.eval()


# ------------------------------------------------------------------------------------------ official GLaMM

def region_config_from_state(state: dict[str, torch.Tensor], prefix: str = "model.region_encoder.") -> RegionConfig:
    """Region encoder sizes read off the tensor shapes (GLaMM hard-codes the rest: 5 fuse rounds are counted,
    GroupNorm 64 groups, strides 14/8..14, the x224 box scale)."""
    def t(name: str) -> torch.Tensor:
        if prefix + name not in state:
            raise CheckpointError(f"checkpoint has no region-encoder tensor {prefix + name}")
        return state[prefix + name]

    count = lambda part: len({k for k in state if k.startswith(prefix + part) and k.endswith(".weight")})
    embed = t("mlvl_fuse.input_conv.0.weight").shape[0]
    query, flat = t("roi_align.flatten_linear.weight").shape
    return RegionConfig(embed_dims=embed, num_levels=count("mlvl_fuse.input_conv."),
                        num_fuse=count("mlvl_fuse.fuse_convs.") // 2,  # conv.weight + gn.weight per round
                        roi_size=round((flat / embed) ** 0.5), pos_hidden=t("roi_align.pos_embedd.0.weight").shape[0],
                        query_dims=query, out_dims=t("roi_align.updims.weight").shape[0])


def glamm_config_from_official(hf_config: dict, state: dict[str, torch.Tensor], clip_config: dict) -> GlammConfig:
    """A :class:`GlammConfig` from an official GLaMM ``config.json``, its tensors and the CLIP tower's config."""
    sam_state = {k.replace("model.grounding_encoder.", "model.visual_model."): v for k, v in state.items()
                 if k.startswith("model.grounding_encoder.")}
    base = lisa_config_from_official(hf_config, sam_state, clip_config)
    fields = {f: getattr(base, f) for f in ("vision", "llm", "sam", "out_dim", "use_im_start_end")}
    return GlammConfig(**fields, projector=hf_config.get("mm_projector_type", "mlp2x_gelu"), tokenization="lisa",
                       region=region_config_from_state(state))


def load_official_glamm(folder: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> GlammModel:
    """Build from an official GLaMM checkpoint folder (``GLaMMForCausalLM``: ``model.region_encoder.*``,
    ``model.grounding_encoder.*`` (SAM), ``model.text_hidden_fcs.*``, ``model.mm_projector.{0,2}.*``; bf16 and
    fp32 tensors mixed -- everything is cast to float32 on load). CLIP (never in GLaMM checkpoints) comes from
    ``vision_tower``, defaulting to the checkpoint's ``mm_vision_tower``. ``<bbox>``/``[SEG]`` ids come from the
    tokenizer by name (the official loader's ``bbox_token_idx`` reset to 32002 is its own quirk)."""
    return _load_official(folder, vision_tower, glamm_config_from_official, _GLAMM_RULES)
