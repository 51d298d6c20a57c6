"""Configs (plain dataclasses, JSON round-trip) and the named presets.

A config says what to build; weights come from elsewhere (``hub.py``). Every dimension that differs between
the official checkpoints lives here, so a preset with real sizes can be built on the ``meta`` device and its
tensor names and shapes compared with the released checkpoints without allocating memory.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class VisionConfig:
    """CLIP vision tower: ``clip`` holds ``transformers.CLIPVisionConfig`` keyword arguments.

    ``pretrained`` names where real weights come from (a folder or hub id) when the checkpoint does not store
    them (LISA and GLaMM never store CLIP)."""

    clip: dict[str, Any]
    select_layer: int = -2
    select_feature: str = "patch"  # "patch" drops CLS; "cls_patch" keeps it
    pretrained: str | None = None

    @property
    def image_size(self) -> int:
        return int(self.clip["image_size"])

    @property
    def num_patches(self) -> int:
        n = (self.image_size // int(self.clip["patch_size"])) ** 2
        return n if self.select_feature == "patch" else n + 1


@dataclass
class SamConfig:
    """segment-anything ``Sam`` build arguments (the same ones ``build_sam._build_sam`` takes, plus the encoder
    head count and window size that the package hard-codes per variant)."""

    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    image_size: int = 1024
    vit_patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.vit_patch_size


SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=(2, 5, 8, 11)),
    # The size of the official LISA parity fixture: 64-pixel input, 4x4 embedding, 32 channels.
    "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                 image_size=64, window_size=3, prompt_embed_dim=32, decoder_mlp_dim=64, iou_head_hidden_dim=32),
}


def sam_config(variant: str) -> SamConfig:
    """SAM config for ``vit_h``/``vit_l``/``vit_b``/``tiny``."""
    if variant not in SAM_VARIANTS:
        raise KeyError(f"unknown SAM variant {variant!r}; expected one of {sorted(SAM_VARIANTS)}")
    return SamConfig(**SAM_VARIANTS[variant])


@dataclass
class LossConfig:
    """LISA's loss weights (reference/lisa.md §3.1) and Dice constants."""

    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    dice_scale: float = 1000.0
    dice_eps: float = 1e-6


@dataclass
class LisaConfig:
    """Everything needed to build a LISA-family model (LLaVA v1 + SAM + ``text_hidden_fcs``)."""

    family: str = "lisa"
    preset: str | None = None
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(clip={}))
    projector: str = "linear"  # "linear" (LISA) or "mlp2x_gelu" (LLaVA-1.5 / GLaMM)
    llm: dict[str, Any] = field(default_factory=dict)  # a transformers config dict with "model_type"
    sam: SamConfig = field(default_factory=SamConfig)
    out_dim: int = 256
    # Image preprocessing for the vision tower: shortest side -> size (bicubic), centre crop, CLIP mean/std.
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    conversation: str = "llava_v1"
    system: str = LLAVA_V1_SYSTEM
    use_im_start_end: bool = True
    # How prompts become ids: "lisa" reproduces the pinned transformers-4.31 slow LLaMA tokenizer that the
    # official checkpoints were trained with (see grounding/conversation.py); "plain" is the tokenizer as is.
    tokenization: str = "lisa"
    losses: LossConfig = field(default_factory=LossConfig)
    # The answer teacher-forced evaluation fixes: LISA's "[SEG]."; "{}" stands for the expression (a model trained
    # to answer "Sure, <p>the red circle</p> [SEG]." is evaluated on that form).
    answer_template: str = "[SEG]."
    # Boxes out through the mask decoder: the state that predicts a <box> token prompts SAM like a [SEG] state, and
    # the box's coordinates are written from that mask's extent instead of being generated digit by digit.
    # Training supervises that state with the box's object mask and leaves the coordinate tokens out of the CE.
    # Off for LISA (whose answers have no boxes); shapes-demo uses it (README, "Numbers").
    box_from_mask: bool = False
    # Where official weights come from for a preset (hub id or folder); None for presets built from scratch.
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LisaConfig":
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config.json: unknown field(s) {unknown} for family {d.get('family')!r}")
        if "vision" in d:
            d["vision"] = VisionConfig(**d["vision"])
        if "sam" in d:
            sam = d["sam"]
            sam["encoder_global_attn_indexes"] = tuple(sam.get("encoder_global_attn_indexes", ()))
            for k in ("pixel_mean", "pixel_std"):
                if k in sam:
                    sam[k] = tuple(sam[k])
            d["sam"] = SamConfig(**sam)
        if "losses" in d:
            d["losses"] = LossConfig(**d["losses"])
        for k in ("clip_mean", "clip_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# --------------------------------------------------------------------------------------------- presets

CLIP_VIT_L14_224 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5)


def _llama(vocab_size: int, hidden: int, inter: int, layers: int, heads: int, rms_eps: float, max_pos: int,
           **extra: Any) -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                rms_norm_eps=rms_eps, max_position_embeddings=max_pos, hidden_act="silu",
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def _lisa_7b() -> LisaConfig:
    return LisaConfig(
        preset="lisa-7b", checkpoint="xinlai/LISA-7B-v1",
        vision=VisionConfig(clip=dict(CLIP_VIT_L14_224), pretrained="openai/clip-vit-large-patch14"),
        llm=_llama(32004, 4096, 11008, 32, 32, 1e-6, 2048), sam=sam_config("vit_h"))


def _lisa_13b() -> LisaConfig:
    return LisaConfig(
        preset="lisa-13b", checkpoint="xinlai/LISA-13B-llama2-v1",
        vision=VisionConfig(clip=dict(CLIP_VIT_L14_224), pretrained="openai/clip-vit-large-patch14"),
        llm=_llama(32003, 5120, 13824, 40, 40, 1e-5, 4096), sam=sam_config("vit_h"))


def _lisa_tiny() -> LisaConfig:
    # The dimensions of the official parity fixture (../shared/parity/lisa_tiny), with our own shipped
    # tokenizer (its vocabulary size is filled in by hub.py from the tokenizer files).
    return LisaConfig(
        preset="lisa-tiny",
        vision=VisionConfig(clip=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=2, image_size=64, patch_size=4, projection_dim=16,
                                      hidden_act="quick_gelu", layer_norm_eps=1e-5)),
        llm=_llama(0, 64, 128, 2, 4, 1e-6, 2048),
        sam=sam_config("tiny"), out_dim=32, tokenization="plain")


SHAPES_SYSTEM = "A chat about the shapes in an image."
# shapes-demo names what it segments right before each [SEG] (its tokenizer lets [SEG] swallow the space), so the
# state that prompts SAM is that of the phrase's last word. Trained from scratch, a model learns to use that state
# far sooner than the content-free one before LISA's bare "[SEG]." (whose LLM was pretrained).
SHAPES_ANSWER = "Sure, {} [SEG]."


def _shapes_llm() -> dict[str, Any]:
    # Tied word embeddings: answering "the red circle" means copying the prompt's name token, and with tied
    # input/output embeddings a head that attends to that token already points at the right output logit.
    llm = _llama(0, 192, 512, 3, 4, 1e-6, 512)
    llm["tie_word_embeddings"] = True
    return llm


def _shapes_demo() -> LisaConfig:
    # The default model: LISA's architecture at a size that trains from scratch on 2 CPU cores in under
    # 45 minutes (groundseg train --preset shapes-demo). SAM sees 128 pixels in 8-pixel patches (a 16x16
    # embedding, 64x64 low-res masks; at 256 pixels it learnt no faster per step and cost 3x), windowed attention
    # with one global layer; the LLM reads 64 CLIP tokens of a 112-pixel view.
    return LisaConfig(
        preset="shapes-demo",
        vision=VisionConfig(clip=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, image_size=112, patch_size=14, projection_dim=64,
                                      hidden_act="quick_gelu", layer_norm_eps=1e-5), select_layer=-1),
        projector="mlp2x_gelu",
        llm=_shapes_llm(),
        sam=SamConfig(encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(3,),
                      image_size=128, vit_patch_size=8, window_size=8, prompt_embed_dim=64, decoder_mlp_dim=256,
                      decoder_num_heads=4, iou_head_hidden_dim=64),
        out_dim=64, tokenization="plain", system=SHAPES_SYSTEM, answer_template=SHAPES_ANSWER, box_from_mask=True)


# --------------------------------------------------------------------------------------------- GLaMM

# GLaMM's evaluation prompts (reference/glamm.md §3). The GCG one has five spaces before "segmentation": the
# official string literal continues over a line break and keeps the indentation, and the model saw it that way.
GLAMM_GCG_PROMPT = ("Could you please give me a detailed description of the image? Please respond with interleaved"
                    "     segmentation masks for the corresponding parts of the answer.")
GLAMM_REGION_PROMPT = "Can you provide me with a detailed description of the region in the picture marked by <bbox>?"
GLAMM_IMAGE_PREFIX = "The {image} provides an overview of the picture.\n"


@dataclass
class RegionConfig:
    """Sizes of GLaMM's RoIAlign region encoder (grounding/region.py). Defaults are the official ones
    (CLIP-L/14-336 features, 4 levels, LLM width 4096)."""

    embed_dims: int = 1024  # CLIP width (input and working channels)
    num_levels: int = 4
    num_fuse: int = 5
    gn_groups: int = 64
    roi_size: int = 14
    sampling_ratio: int = 2
    featmap_strides: tuple[float, ...] = (14 / 8, 14 / 4, 14 / 2, 14.0)
    # Boxes (normalised to the image) are multiplied by this before RoIAlign. 224 is GLaMM's GPT4RoI leftover
    # on a 336-px CLIP, which the released weights were trained with (see grounding/region.py); None = the span
    # the feature maps really cover (grid * last stride).
    roi_box_scale: float | None = 224.0
    pos_hidden: int = 256  # box MLP: 4 -> pos_hidden -> query_dims
    query_dims: int = 1024  # flatten_linear output
    out_dims: int = 4096  # LLM width
    grid: int = 24  # CLIP patch grid (g x g); GLaMM asserts 24

    @property
    def map_sizes(self) -> list[int]:
        """Side of each level's map after upsampling, finest first (192, 96, 48, 24)."""
        return [self.grid * 2 ** (self.num_levels - 1 - lvl) for lvl in range(self.num_levels)]

    @property
    def box_scale(self) -> float:
        return float(self.roi_box_scale) if self.roi_box_scale is not None else self.grid * self.featmap_strides[-1]


@dataclass
class GlammConfig(LisaConfig):
    """GLaMM = LISA's parts on LLaVA-1.5 (``mlp2x_gelu`` projector) + a region encoder + GLaMM's prompts."""

    family: str = "glamm"
    projector: str = "mlp2x_gelu"
    region: RegionConfig = field(default_factory=RegionConfig)
    # Every first user turn starts with this ({image} = the image placeholder, with <im_start>/<im_end>).
    image_prefix: str = GLAMM_IMAGE_PREFIX
    gcg_prompt: str = GLAMM_GCG_PROMPT
    region_prompt: str = GLAMM_REGION_PROMPT

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GlammConfig":
        d = copy.deepcopy(d)
        region = d.pop("region", None)
        cfg = super().from_dict(d)
        if region is not None:
            region["featmap_strides"] = tuple(region.get("featmap_strides", ()))
            cfg.region = RegionConfig(**region)
        return cfg


CLIP_VIT_L14_336 = dict(CLIP_VIT_L14_224, image_size=336)


def _glamm() -> GlammConfig:
    # GLaMM-FullScope: Vicuna-7B v1.5 (vocab 32000 + 7 GLaMM tokens), CLIP-L/14-336, SAM ViT-H.
    return GlammConfig(
        preset="glamm", checkpoint="MBZUAI/GLaMM-FullScope",
        vision=VisionConfig(clip=dict(CLIP_VIT_L14_336), pretrained="openai/clip-vit-large-patch14-336"),
        llm=_llama(32007, 4096, 11008, 32, 32, 1e-5, 4096), sam=sam_config("vit_h"))


def _glamm_tiny() -> GlammConfig:
    # The dimensions of the official parity fixture (../shared/parity/glamm_tiny): an 11-layer CLIP of width 64
    # on 96-px images in 4-px patches (24x24 patches, as GLaMM needs), region levels at hidden states 1/4/7/10;
    # with our own shipped tokenizer (lisa-tiny's, which has GLaMM's tokens).
    return GlammConfig(
        preset="glamm-tiny",
        vision=VisionConfig(clip=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=11,
                                      num_attention_heads=4, image_size=96, patch_size=4, projection_dim=16,
                                      hidden_act="quick_gelu", layer_norm_eps=1e-5)),
        llm=_llama(0, 64, 128, 2, 4, 1e-5, 4096),
        sam=sam_config("tiny"), out_dim=32, tokenization="plain",
        region=RegionConfig(embed_dims=64, pos_hidden=8, query_dims=16, out_dims=64))


def _glamm_shapes() -> GlammConfig:
    # shapes-demo's sizes as a GLaMM (trains from scratch on the shapes world: groundseg train --preset
    # glamm-shapes), with a small region encoder: 2 levels (CLIP hidden states 0 and 3 of its 3 layers, 8x8
    # patches of a 112-px view, upsampled to 16 and 8 cells at strides 7 and 14), 7x7 RoIs, boxes scaled by the
    # 112 px the maps really span (the official weights' 224 is a leftover on a 336-px CLIP). Region questions are
    # the shapes world's "What is in <bbox>?".
    # The vision tower is shapes-demo's (112 px). Trained only through the language and mask losses it could not
    # tell shapes apart (region captions named the right shape 20% of the time, at 112 or 224 px), so the recipe
    # pretrains it first on dense colour/shape/size labels (train/vision_pretrain.py).
    base = _shapes_demo()
    kept = {f.name: getattr(base, f.name) for f in dataclasses.fields(LisaConfig) if f.name not in ("family",)}
    return GlammConfig(**{**kept, "preset": "glamm-shapes"},
                       region=RegionConfig(embed_dims=128, num_levels=2, num_fuse=2, gn_groups=32, roi_size=7,
                                           featmap_strides=(7.0, 14.0), roi_box_scale=None, pos_hidden=64,
                                           query_dims=128, out_dims=192, grid=8),
                       region_prompt="What is in <bbox>?")


PRESETS = {"lisa-7b": _lisa_7b, "lisa-13b": _lisa_13b, "lisa-tiny": _lisa_tiny, "shapes-demo": _shapes_demo,
           "glamm": _glamm, "glamm-tiny": _glamm_tiny, "glamm-shapes": _glamm_shapes}


def preset_config(name: str) -> LisaConfig:
    """A fresh config for a named preset (KeyError naming the known presets otherwise)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------- Sa2VA

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Sa2VA's released inference code builds SAM2's mean/std in bfloat16 (the image itself stays float32), so these
# are the values it really normalises with (reference: parity/sa2va_tiny README, "Preprocessing").
SA2VA_SAM2_MEAN_BF16 = (0.484375, 0.455078125, 0.40625)
SA2VA_SAM2_STD_BF16 = (0.228515625, 0.2236328125, 0.224609375)


@dataclass
class Sam2Config:
    """Which SAM2 to build: a config shipped inside the ``sam2`` package (a hydra name such as
    ``configs/sam2/sam2_hiera_l.yaml``; absolute paths do not work with it) plus hydra overrides for other sizes.
    ``pixel_mean``/``pixel_std`` normalise [0, 1] pixels; ``resize`` is the PIL filter to S x S."""

    config_file: str = "configs/sam2/sam2_hiera_l.yaml"
    overrides: list[str] = field(default_factory=list)
    pixel_mean: tuple[float, float, float] = SA2VA_SAM2_MEAN_BF16
    pixel_std: tuple[float, float, float] = SA2VA_SAM2_STD_BF16
    resize: str = "bicubic"


def sam2_small_overrides(embed: int = 8, d_model: int = 32, mem_dim: int = 16, heads: int = 1) -> list[str]:
    """Hydra overrides on ``configs/sam2/sam2_hiera_t.yaml`` for a small SAM2: a 4-stage Hiera of width ``embed``
    (blocks 1, 1, 2, 1; one global-attention block), an FPN neck, 2-layer memory attention and the prompt/mask heads
    of width ``d_model``, memories of ``mem_dim`` channels."""
    m = "++model."
    tr, ma, me = m + "image_encoder.trunk.", m + "memory_attention.", m + "memory_encoder."
    chans = [embed * 8, embed * 4, embed * 2, embed]
    return [
        tr + f"embed_dim={embed}", tr + f"num_heads={heads}", tr + "stages=[1,1,2,1]", tr + "global_att_blocks=[3]",
        tr + "window_pos_embed_bkg_spatial_size=[4,4]", tr + "window_spec=[8,4,4,4]",
        m + f"image_encoder.neck.d_model={d_model}",
        m + f"image_encoder.neck.backbone_channel_list=[{','.join(map(str, chans))}]",
        m + f"image_encoder.neck.position_encoding.num_pos_feats={d_model}",
        ma + f"d_model={d_model}", ma + "num_layers=2", ma + f"layer.d_model={d_model}",
        ma + f"layer.dim_feedforward={2 * d_model}",
        ma + f"layer.self_attention.embedding_dim={d_model}", ma + "layer.self_attention.feat_sizes=[32,32]",
        ma + f"layer.cross_attention.embedding_dim={d_model}", ma + "layer.cross_attention.feat_sizes=[32,32]",
        ma + f"layer.cross_attention.kv_in_dim={mem_dim}",
        me + f"out_dim={mem_dim}", me + f"in_dim={d_model}", me + f"position_encoding.num_pos_feats={mem_dim}",
        me + f"mask_downsampler.embed_dim={d_model}", me + f"fuser.layer.dim={d_model}",
    ]


def sam2_tiny_overrides() -> list[str]:
    """Hydra overrides on ``configs/sam2/sam2_hiera_t.yaml`` giving the SAM2 of the Sa2VA tiny parity fixture
    (Hiera embed 8, d_model 32, memory 16 channels); the input stays 1024 as in every release."""
    return sam2_small_overrides(8, 32, 16, 1)


@dataclass
class Sa2VALossConfig:
    """Sa2VA's mask losses (reference/sa2va.md §2): BCE x 2.0 + naive Dice (eps 1) x 0.5 on uncertainty-sampled
    points of the 256 x 256 logits; ``num_points = 0`` scores every pixel instead."""

    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    dice_eps: float = 1.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    objects_per_frame: int = 5  # check_obj_number(fix_number=5): repeat or subsample each sample's objects
    # Train SAM2's video path too (not in Sa2VA, whose SAM2 comes pretrained): each sample's key frames are
    # prompted with its [SEG] states, every other frame is tracked through SAM2's memory, and every frame's masks
    # are supervised (all candidate masks, plus the predicted IoU and the object-presence score). For SAM2s trained
    # from scratch (sa2va-shapes), whose memory has learnt nothing.
    track_memory: bool = False
    iou_weight: float = 1.0  # track_memory: MSE of the predicted IoU of each candidate mask against its real IoU
    object_weight: float = 1.0  # track_memory: BCE of SAM2's object score against "the object is in the frame"


@dataclass
class Sa2VAConfig:
    """A Sa2VA model, InternVL2.5 layout: InternViT (``vision``: InternVisionConfig-style keywords) + ``mlp1`` +
    a transformers causal LM (``llm``: config dict with ``model_type``) + SAM2 + ``text_hidden_fcs`` to
    ``out_dim``. ``template`` names the chat template (``qwen_chat``, ``internlm2_chat``, ``phi3_chat``), as the
    release's config.json does; ``key_frames``/``num_key_frames`` choose the frames the MLLM sees in a video."""

    family: str = "sa2va"
    preset: str | None = None
    vision: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    sam2: Sam2Config = field(default_factory=Sam2Config)
    out_dim: int = 256
    template: str = "qwen_chat"
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    mllm_mean: tuple[float, float, float] = IMAGENET_MEAN
    mllm_std: tuple[float, float, float] = IMAGENET_STD
    key_frames: str = "first"  # "first" (as released) or "uniform"
    num_key_frames: int = 5
    answer_template: str = "Sure, [SEG]."
    losses: Sa2VALossConfig = field(default_factory=Sa2VALossConfig)
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sa2VAConfig":
        d = copy.deepcopy(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config.json: unknown field(s) {unknown} for family {d.get('family')!r}")
        if "sam2" in d:
            s = d["sam2"]
            for k in ("pixel_mean", "pixel_std"):
                if k in s:
                    s[k] = tuple(s[k])
            d["sam2"] = Sam2Config(**s)
        if "losses" in d:
            d["losses"] = Sa2VALossConfig(**d["losses"])
        for k in ("mllm_mean", "mllm_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _qwen2(vocab_size: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, **extra: Any
           ) -> dict[str, Any]:
    return dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1000000.0, tie_word_embeddings=False,
                use_sliding_window=False, **extra)


def _internvit(hidden: int, inter: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=448, patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
                layer_norm_eps=1e-6, hidden_act="gelu")


def _sa2va_4b() -> Sa2VAConfig:
    # ByteDance/Sa2VA-4B: InternViT-300M-448px-V2_5 + Qwen2.5-3B-Instruct + SAM2.0 Hiera-L; phi3_chat template
    # (reference/sa2va.md §1.1); vocabulary 151674 InternVL2.5 tokens + 5 Sa2VA tokens.
    return Sa2VAConfig(preset="sa2va-4b", checkpoint="ByteDance/Sa2VA-4B", vision=_internvit(1024, 4096, 24, 16),
                       llm=_qwen2(151679, 2048, 11008, 36, 16, 2, max_position_embeddings=32768),
                       sam2=Sam2Config("configs/sam2/sam2_hiera_l.yaml"), template="phi3_chat")


def _sa2va_tiny() -> Sa2VAConfig:
    # The dimensions of the official parity fixture (../shared/parity/sa2va_tiny) with our own shipped tokenizer
    # (its vocabulary size is filled in from the tokenizer), except that SAM2 reads 256 pixels instead of 1024
    # (a 16x16 embedding): 16x less work per frame for tests of the video path.
    return Sa2VAConfig(preset="sa2va-tiny", vision=_internvit(32, 64, 2, 2),
                       llm=_qwen2(0, 64, 128, 2, 4, 2, max_position_embeddings=4096),
                       sam2=Sam2Config("configs/sam2/sam2_hiera_t.yaml",
                                       sam2_tiny_overrides() + ["++model.image_size=256"]), out_dim=32)


def _sa2va_shapes() -> Sa2VAConfig:
    # Sa2VA at a size that trains from scratch on the shapes world's videos (groundseg train --preset
    # sa2va-shapes): InternViT of 112-pixel frames (16 tokens each after the pixel shuffle: behind 5 frames of 64
    # tokens the from-scratch LLM learnt to copy names far later, README "Sa2VA training"), a 3-layer Qwen2 with
    # tied embeddings (it must copy the name it is asked about), a small SAM2 on 256-pixel frames (16x16
    # embedding, 64x64 masks) whose memory is trained too (losses.track_memory). Key frames: 5 uniformly spaced
    # (the released first-5 rule sees too little motion in a 16-frame clip to tell "moving left" from "right").
    llm = _qwen2(0, 192, 512, 3, 4, 4, max_position_embeddings=1024)
    llm["tie_word_embeddings"] = True
    vision = _internvit(128, 512, 3, 4)
    vision["image_size"] = 112
    return Sa2VAConfig(preset="sa2va-shapes", vision=vision, llm=llm,
                       sam2=Sam2Config("configs/sam2/sam2_hiera_t.yaml",
                                       sam2_small_overrides(24, 64, 32, 1) + ["++model.image_size=256"]),
                       out_dim=64, max_dynamic_patch=1, use_thumbnail=False, key_frames="uniform",
                       answer_template="Sure, {} [SEG].",
                       losses=Sa2VALossConfig(num_points=0, track_memory=True))


def _sa2va_qwen_tiny():
    # Sa2VA on Qwen2.5-VL (grounding/sa2va_qwen.py) at test size, with its shipped tokenizer (assets/sa2va-qwen-tiny,
    # whose vision token ids are fixed: <|vision_start|> 3, <|vision_end|> 4, <|image_pad|> 5, <|video_pad|> 6; the
    # vocabulary size comes from it): a 2-layer Qwen2.5-VL text model of width 64 (mrope 2+3+3 of 8 frequencies), a
    # 2-block ViT of width 32 (patch 14, 2x2 merge), SAM2 as sa2va-tiny's, 16..64 merged tokens per image.
    from .grounding.sa2va_qwen import Sa2VAQwenConfig

    text = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
                use_sliding_window=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu")
    qwen = dict(text_config=text, vision_config=vision, vision_start_token_id=3, vision_end_token_id=4,
                image_token_id=5, video_token_id=6, tie_word_embeddings=False)
    return Sa2VAQwenConfig(preset="sa2va-qwen-tiny", qwen=qwen,
                           sam2=Sam2Config("configs/sam2/sam2_hiera_t.yaml",
                                           sam2_tiny_overrides() + ["++model.image_size=256"]),
                           out_dim=32, min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)


SA2VA_PRESETS = {"sa2va-4b": _sa2va_4b, "sa2va-tiny": _sa2va_tiny, "sa2va-shapes": _sa2va_shapes,
                 "sa2va-qwen-tiny": _sa2va_qwen_tiny}
