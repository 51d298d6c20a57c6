"""The training loop, on accelerate: one CPU, one GPU, or many GPUs/nodes (DDP, DeepSpeed ZeRO-2, FSDP through
accelerate's config files in ``groundseg/train/configs/``).

What a run does, in order: build or load the model (a preset, a folder in our format, an official checkpoint),
add LoRA adapters and set LISA's trainable set (or train everything for a from-scratch preset), then for
``steps`` optimizer steps: ``grad_accum`` micro-batches of ``batch_size`` images per process, AdamW with linear
warm-up and linear decay, gradient clipping, bf16 autocast on GPU. Every ``save_every`` steps it writes an
accelerate checkpoint (model, optimizer, scheduler, RNG states) that ``--resume`` continues from exactly; at the
end it merges LoRA and exports the model in our format to ``<out>/final``. The run folder also gets
``metrics.jsonl`` (one line per logged step), ``loss.png`` and ``train_config.json``.

Data is indexed, not streamed: micro-batch ``m`` of process ``r`` among ``W`` holds samples
``(m * W + r) * B ... + B - 1`` of the mixed source, each drawn from its own seeded RNG, so a resumed run and an
uninterrupted one see the same samples (resume on the same number of processes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import LossConfig
from ..io import InputError
from .data import Collator, build_source
from .lora import LISA_TRAINABLE, apply_lora, merge_lora, set_trainable


@dataclass
class TrainConfig:
    """Everything a run needs; ``train_config.json`` in the run folder is this, as JSON."""

    out: str = "runs/train"
    model: str = "lisa-tiny"  # preset, our folder, or official checkpoint folder
    from_scratch: bool = False  # a preset built with seeded random weights (ignores a shipped trained copy)
    init_from: str | None = None  # a model (preset or folder) whose same-named, same-shaped tensors start the run
    init_exclude: list[str] = field(default_factory=list)  # name prefixes that init_from does not copy
    vision_tower: str | None = None
    dataset: str = "shapes"  # LISA's 'a||b' list
    sample_rates: list[float] | None = None
    data_root: str | None = None
    refer_datasets: str = "refcoco"
    image_dir: str | None = None  # REFER images (default: <data_root>/images)
    shapes_tasks: dict[str, float] | None = None
    shapes_seed: int = 0
    shapes_image_size: int = 256
    shapes_max_expressions: int = 3  # referring expressions per image and sample (LISA uses up to 3)
    shapes_video_frames: int = 16  # frames per video sample (shapes task "video")
    shapes_kinds: list[str] | None = None  # expression kinds of refer/video questions (None: all)
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    trainable: list[str] = field(default_factory=lambda: list(LISA_TRAINABLE))
    frozen: list[str] = field(default_factory=list)
    train_all: bool = False
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    attribute_weight: float = 0.0  # auxiliary attribute probes (train/probes.py); shapes-world data only
    token_attribute_weight: float = 0.0  # the same probes on the LLM's image tokens (train/probes.py)
    region_attribute_weight: float = 0.0  # ... and on GLaMM's region vectors (region-caption boxes)
    token_position_weight: float = 0.0  # each image token's row and column, read back linearly (train/probes.py)
    name_weight: float = 0.0  # GLaMM region vectors pulled to their object's name embedding (train/probes.py)
    token_name_weight: float = 0.0  # ... and image tokens turned towards theirs (train/probes.py)
    # Stage 1 of a from-scratch shapes recipe (train/vision_pretrain.py): the vision tower alone learns colour,
    # shape and size from dense labels before the main run. 0 = no such stage.
    vision_pretrain_steps: int = 0
    vision_pretrain_batch: int = 32
    vision_pretrain_lr: float = 1e-3
    vision_pretrain_images: int = 8000
    # GLaMM: the stage also trains the region encoder, each box's vector pulled to its object's name embedding
    vision_pretrain_region_weight: float = 0.0
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    device: str | None = None  # None: accelerate decides (cuda when present); "cpu" forces CPU
    export: bool = True
    progress: bool = True
    stop_at: int | None = None  # stop (with a checkpoint) after this step; --resume continues the same schedule
    # Minutes of training (data loading included, model building and export not): the learning rate decays on
    # whichever of steps or time is further along, and the run ends -- exported like a finished one -- when the
    # time is up or at ``steps``, whichever comes first. For a fixed budget on hardware of unknown speed.
    time_limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Documented recipes: `groundseg train --preset NAME` starts from these values (flags still override them).
RECIPES: dict[str, dict[str, Any]] = {
    # The shipped default model: everything trained from scratch on the shapes world (no LoRA: a randomly
    # initialised LLM has nothing for adapters to adapt). Seeds fixed; 42.5 minutes on 2 CPU cores.
    # - Answers name the target ("Sure, the blue square [SEG].") and every name is one token (see
    #   tiny_tokenizer.shapes_name_phrases), so the state before [SEG] always carries the target's name.
    # - attribute_weight: auxiliary colour/shape/size probes (train/probes.py), the dense signal that teaches a
    #   from-scratch SAM encoder what a circle is far sooner than the mask losses alone.
    # - ce_weight 1.0 (LISA's) with tied word embeddings (config.py): the LLM must learn to copy the name it is
    #   asked about into its answer. At ce_weight 0.01 or 0.1 it never did (4500 steps: every answer named the
    #   same shape); at 1.0 it copies in a few hundred steps, and the mask losses were no worse for it.
    # - "objects" (every object named, one [SEG] each) gives the most masks per LLM pass; grounded captions are
    #   left out (their [SEG] follows "</p>", a state that needs what the names give for free).
    # - "box" questions (up to 3 per image) train the <box> state through the mask losses: the preset has
    #   box_from_mask, so box coordinates are read off that mask (digit-by-digit boxes stayed image-independent).
    "shapes-demo": dict(model="shapes-demo", from_scratch=True, dataset="shapes", lora=False, train_all=True,
                        shapes_tasks={"refer": 6, "objects": 3, "multi": 1, "box": 1}, shapes_max_expressions=3,
                        steps=4600, batch_size=8, grad_accum=1, lr=2e-3, min_lr_ratio=0.05, weight_decay=0.01,
                        warmup_steps=100, clip_grad=1.0, ce_weight=1.0, attribute_weight=1.0, save_every=250,
                        log_every=10, num_workers=0, out="runs/shapes-demo"),
    # Sa2VA on the shapes world's moving-shapes videos, everything from scratch, in two stages, both time-limited
    # (their step counts depend on the hardware). Not yet trained to the bar (README, "Sa2VA training").
    # Stage 1 (CPU, 45 minutes on 2 cores): the vision tower, the LLM and SAM2's single-frame path, on still images
    # (referring, 1 in 3) and on clips' 5 uniformly spaced key frames (video_keys, each a conditioning frame: the
    # MLLM sees what it sees at inference, at a fifth of a full clip's SAM2 work).
    # - attribute expressions only: the LLM learns to copy the name into its answer ("the small star" -> "Sure,
    #   the small star [SEG]."). With motion questions in the mix, or at lr 1.5e-3, or with 64 tokens a frame
    #   (224-pixel frames), it did not in the time (README).
    # - up to 3 expressions per clip or image, about different objects (one turn each): SAM2 learns to tell the
    #   objects apart, not only objects from background (key-frame mIoU at step 500: 0.45, against 0.34 with one).
    # - attribute probes on SAM2's features, the [SEG] prompts and the image tokens (train/probes.py).
    # - first, 700 steps (about 5 minutes) of vision pretraining for SAM2's image encoder: its features did not
    #   tell shapes apart (a probe read shape on 28% of object pixels), and with the stage, teacher-forced key-frame
    #   mIoU at step 1000 was 0.67 against 0.54 (README). The main loop then has 40 of the 45 minutes.
    "sa2va-shapes-keys": dict(model="sa2va-shapes", from_scratch=True, dataset="shapes", lora=False, train_all=True,
                              shapes_tasks={"refer": 1, "video_keys": 2}, shapes_max_expressions=3,
                              shapes_kinds=["attribute"], shapes_video_frames=16, steps=100_000, time_limit=40.0,
                              batch_size=8, grad_accum=1, lr=5e-4, min_lr_ratio=0.5, weight_decay=0.01,
                              warmup_steps=100, clip_grad=1.0, ce_weight=1.0, attribute_weight=1.0,
                              token_attribute_weight=1.0, vision_pretrain_steps=700, vision_pretrain_batch=16,
                              vision_pretrain_lr=1e-3, vision_pretrain_images=2000, save_every=100, log_every=20,
                              num_workers=0, out="runs/sa2va-shapes-keys"),
    # Stage 2 (one GPU, 9 minutes): whole 16-frame clips with SAM2's memory trained too (losses.track_memory: key
    # frames prompted, the rest tracked, every frame supervised), attribute and motion expressions (the LLM names
    # the target of "the shape moving up"), from stage 1's model. A step is launch-bound (on an H100: 0.79 s at
    # 16 clips, 1.07 s at 32 on ready data), hence the large batch; at 48, 13 workers, the loop ran 1.5 s a step.
    "sa2va-shapes": dict(model="sa2va-shapes", from_scratch=True, init_from="runs/sa2va-shapes-keys/final",
                         dataset="shapes", lora=False, train_all=True, shapes_tasks={"video": 1},
                         shapes_max_expressions=3, shapes_video_frames=16, steps=100_000, time_limit=9.0,
                         batch_size=48, grad_accum=1, lr=5e-4, min_lr_ratio=0.1, weight_decay=0.01,
                         warmup_steps=20, clip_grad=1.0, ce_weight=1.0, attribute_weight=1.0,
                         token_attribute_weight=1.0, precision="fp32",
                         save_every=50, log_every=10, num_workers=13, out="runs/sa2va-shapes"),
    # GLaMM on the shapes world: starts from the shipped shapes-demo (same sizes: its CLIP, LLM, SAM and projectors
    # already name and segment shapes), so only the region encoder starts from random weights and the run teaches
    # the GLaMM tasks: grounded captions ("<p> a red circle </p> [SEG]"), region captions from <bbox>, and
    # referring segmentation in GLaMM's prompt wording.
    # - vision_pretrain_steps: shapes-demo's LLM copies names from the question and never had to read the image
    #   tokens, so its vision tower says little about shapes (runs without this stage captioned regions with the
    #   right shape 19-23% of the time, chance being 17%). The stage (train/vision_pretrain.py) first trains the
    #   tower alone on the shapes world's dense colour/shape/size labels; token_attribute_weight keeps the image
    #   tokens saying what is where during the main run. The tower starts from random weights, not shapes-demo's:
    #   from those the stage did not learn shape at all (held-out object accuracy 0.16 after 1000 steps, against
    #   0.54 from random weights).
    # - name_weight: each region vector is pulled to the LLM's embedding of its object's one-token name (" large
    #   red circle"; train/probes.py). Trained through the LLM's loss alone, the region encoder lost everything:
    #   a linear probe read colour and shape off its vectors at chance (a random encoder's: 70% and 59%), and
    #   region captions named both right 16% of the time; with the pull, 96%/77% and 45% (README, "GCG and
    #   region captions"). No region_attribute_weight (the probes on region vectors read layer-normed vectors
    #   and did not stop that loss).
    # - vision_pretrain_region_weight: the vision stage trains the region encoder too (same pull, same tower
    #   pass), so the main run starts with region vectors that read as names: region captions 85.7% right
    #   (colour and shape), against 58.6% with the pull in the main run only (3000 steps there); the stage's
    #   extra 3.5 minutes come out of the main run (2500 steps). 39.6 minutes on 2 CPU cores.
    "glamm-shapes": dict(model="glamm-shapes", from_scratch=True, init_from="shapes-demo",
                         init_exclude=["vlm.vision_tower."], dataset="shapes", lora=False, train_all=True,
                         shapes_tasks={"refer": 1, "objects": 2, "gcg": 4, "regcap": 3}, shapes_max_expressions=3,
                         name_weight=1.0, steps=2500, batch_size=8, grad_accum=1, lr=1e-3, min_lr_ratio=0.05,
                         weight_decay=0.01, warmup_steps=50, clip_grad=1.0, ce_weight=1.0, attribute_weight=1.0,
                         token_attribute_weight=1.0, vision_pretrain_steps=6000, vision_pretrain_region_weight=1.0,
                         vision_pretrain_batch=32, vision_pretrain_lr=2e-3, vision_pretrain_images=12000,
                         save_every=250, log_every=10, num_workers=0, out="runs/glamm-shapes"),
}


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.0, clock: "TimeBudget | None" = None):
    """Linear warm-up over ``warmup`` steps from 0, then linear decay to ``min_ratio`` at ``total``; with a
    ``clock``, the decay follows whichever of steps and the clock's used fraction of time is further along."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        if clock is not None:
            frac = max(frac, clock.fraction())
        return max(min_ratio, 1.0 - (1.0 - min_ratio) * min(1.0, frac))
    return f


class TimeBudget:
    """``--time-limit``: minutes of training, counted from :meth:`start` plus what earlier runs of a resumed run
    used (``spent``, seconds); ``now`` is replaceable for tests."""

    def __init__(self, minutes: float, spent: float = 0.0, now=time.perf_counter):
        if not minutes > 0:
            raise InputError(f"--time-limit {minutes}: expected a positive number of minutes")
        self.limit, self.spent, self.now, self.t0 = minutes * 60.0, spent, now, None

    def start(self) -> None:
        self.t0 = self.now()

    def elapsed(self) -> float:
        return self.spent + (0.0 if self.t0 is None else self.now() - self.t0)

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / self.limit)

    def up(self) -> bool:
        return self.elapsed() >= self.limit


def build_for_training(cfg: TrainConfig):
    """The model a run starts from, adapters added and trainable set marked."""
    from ..hub import build_model, load_model, load_tokenizer, preset_tokenizer_dir
    from ..config import PRESETS, preset_config

    from ..config import SA2VA_PRESETS, Sa2VALossConfig

    torch.manual_seed(cfg.seed)
    if cfg.from_scratch and cfg.model in SA2VA_PRESETS:
        from ..grounding.sa2va_hub import ASSETS, build_sa2va

        model = build_sa2va(SA2VA_PRESETS[cfg.model](), load_tokenizer(ASSETS / cfg.model))
    elif cfg.from_scratch:
        if cfg.model not in PRESETS:
            raise InputError(f"--from-scratch needs a preset, got {cfg.model!r}")
        pc = preset_config(cfg.model)
        tok_dir = preset_tokenizer_dir(cfg.model)
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
            raise InputError(f"preset {cfg.model!r} ships no tokenizer in {tok_dir}")
        model = build_model(pc, load_tokenizer(tok_dir))
    else:
        model = load_model(cfg.model, vision_tower=cfg.vision_tower)
    if cfg.init_from:
        init_weights(model, cfg.init_from, cfg.init_exclude)
    if isinstance(model.config.losses, Sa2VALossConfig):  # the family's own loss settings, our weights
        model.config.losses = dataclasses.replace(model.config.losses, ce_weight=cfg.ce_weight,
                                                  bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
    else:
        model.config.losses = LossConfig(ce_weight=cfg.ce_weight, bce_weight=cfg.bce_weight,
                                         dice_weight=cfg.dice_weight, dice_scale=model.config.losses.dice_scale,
                                         dice_eps=model.config.losses.dice_eps)
    if cfg.lora:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    counts = set_trainable(model, cfg.trainable, cfg.frozen, cfg.train_all)
    return model.float(), counts


def init_weights(model: torch.nn.Module, source: str, exclude: list[str] | tuple[str, ...] = ()) -> tuple[int, int]:
    """Copy into ``model`` every tensor of the model ``source`` (preset or folder) with the same name and shape,
    e.g. a trained LISA's into a fresh GLaMM of the same sizes, whose region encoder then starts from its seeded
    random weights. Names starting with one of ``exclude`` keep theirs too. Returns (tensors copied, tensors of
    ``model``); no shared tensor is a one-line error."""
    from ..hub import load_model

    try:
        state = load_model(source).state_dict()
    except InputError as e:
        first = [n for n, r in RECIPES.items() if f"{r['out']}/final" == str(source).rstrip("/")]
        hint = f" (it is made by the first stage: groundseg train --preset {first[0]})" if first else ""
        raise InputError(f"--init-from {source}: {e}{hint}") from None
    own = model.state_dict()
    same = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)
            and not k.startswith(tuple(exclude))}
    if not same:
        raise InputError(f"--init-from {source}: no tensor of it matches the model in name and shape")
    model.load_state_dict(same, strict=False)
    print(f"init from {source}: {len(same)} of {len(own)} tensors copied "
          f"({len(own) - len(same)} keep their initial values)")
    return len(same), len(own)


class _Batches(torch.utils.data.Dataset):
    """Micro-batch ``i`` of this process, collated (so DataLoader workers do generation and preprocessing)."""

    def __init__(self, source, collator, batch_size: int, rank: int, world: int, start: int, stop: int):
        self.source, self.collator = source, collator
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    @staticmethod
    def indices(m: int, rank: int, world: int, batch_size: int) -> range:
        """Sample indices of micro-batch ``m`` on process ``rank`` of ``world``."""
        first = (m * world + rank) * batch_size
        return range(first, first + batch_size)

    def __getitem__(self, i: int):
        idx = self.indices(self.start + i, self.rank, self.world, self.batch_size)
        samples = [self.source[k] for k in idx]
        batch = self.collator(samples)
        batch.tasks = [s.task for s in samples]
        return batch


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run training; returns the run folder. ``resume`` continues from the newest checkpoint in ``cfg.out``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm import tqdm

    out = Path(cfg.out)
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "shapes_max_expressions"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected at least 1")
    if cfg.num_workers < 0:
        raise InputError(f"--num-workers {cfg.num_workers}: expected 0 or more")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        raise InputError(f"--time-limit {cfg.time_limit:g}: expected a positive number of minutes")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"--precision {cfg.precision!r}: expected auto, fp32 or bf16")
    cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    mp = {"fp32": "no", "bf16": "bf16", "auto": "no" if cpu else "bf16"}[cfg.precision]
    accelerator = Accelerator(mixed_precision=mp, cpu=cpu, gradient_accumulation_steps=cfg.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    ckpt = _latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise InputError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if ckpt is None and (out / "metrics.jsonl").exists():  # on every rank, so none is left waiting in prepare()
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    model, (n_train, n_total) = build_for_training(cfg)
    config, tokenizer = model.config, model.tokenizer
    if cfg.attribute_weight < 0:
        raise InputError(f"--attribute-weight {cfg.attribute_weight}: expected 0 or more")
    if cfg.token_position_weight and not cfg.attribute_weight:
        raise InputError(f"--token-position-weight {cfg.token_position_weight}: the probes run only with "
                         "--attribute-weight > 0")
    for flag, v in (("--name-weight", cfg.name_weight), ("--token-name-weight", cfg.token_name_weight)):
        if v and not (cfg.attribute_weight and getattr(model, "family", "") == "glamm"):
            raise InputError(f"{flag} {v}: name alignment runs only for GLaMM models with --attribute-weight > 0")
    if cfg.vision_pretrain_steps and ckpt is None:  # a resumed run has the pretrained tower in its checkpoint
        _vision_stage(cfg, model, accelerator, out)
    if cfg.attribute_weight and getattr(model, "family", "") == "sa2va":
        if cfg.region_attribute_weight:
            raise InputError("--region-attribute-weight: Sa2VA models have no region encoder")
        from .probes import Sa2VAProbedModel

        model = Sa2VAProbedModel(model, cfg.attribute_weight, cfg.token_attribute_weight, cfg.token_position_weight)
    elif cfg.attribute_weight:
        from .probes import ProbedModel

        model = ProbedModel(model, cfg.attribute_weight, cfg.token_attribute_weight, cfg.region_attribute_weight,
                            cfg.token_position_weight, cfg.name_weight, cfg.token_name_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    clock = TimeBudget(cfg.time_limit) if cfg.time_limit is not None else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, clock))
    base = getattr(model, "model", model)
    collator = base.collator() if hasattr(base, "collator") else Collator(config, tokenizer)
    source = build_source(cfg.dataset, cfg.sample_rates, cfg.shapes_seed, cfg.data_root, cfg.refer_datasets,
                          image_dir=cfg.image_dir, shapes_tasks=cfg.shapes_tasks, image_size=cfg.shapes_image_size,
                          max_expressions=cfg.shapes_max_expressions,
                          video_frames=cfg.shapes_video_frames, shapes_kinds=cfg.shapes_kinds)
    if accelerator.state.deepspeed_plugin is not None:
        # The DataLoader is ours (not prepared), so DeepSpeed cannot infer these "auto" values itself.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["gradient_clipping"] = cfg.clip_grad
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step = state["step"]
        if clock is not None:
            clock.spent = float(state.get("elapsed_s", 0.0))
        if accelerator.is_main_process:  # a crash after the checkpoint left rows the resumed run will log again
            _trim_metrics(out / "metrics.jsonl", step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    threads = torch.get_num_threads()  # restored after the loop (train() may be called from a longer session)
    if cfg.num_workers and threads > 1:
        # The workers keep their cores busy; a main process whose ops each spread over every core then waits at
        # each op's barrier for threads the workers have preempted. Leave it the cores the workers do not use.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - cfg.num_workers)))
    loader = torch.utils.data.DataLoader(
        _Batches(source, collator, cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                 step * cfg.grad_accum, cfg.steps * cfg.grad_accum),
        batch_size=None, shuffle=False, num_workers=cfg.num_workers, worker_init_fn=_quiet_worker,
        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
        # Workers are not forked from this process: it has thread pools (torch's, OpenCV's) running by now, and a
        # child forked from a threaded parent can deadlock on a lock one of those threads held (it did, once, in
        # the test suite). A fork server starts from a clean interpreter; the batches object is pickled to it.
        multiprocessing_context=_worker_context() if cfg.num_workers else None,
        # its own generator: creating the iterator would otherwise draw from the global RNG, which a resumed
        # run has just restored, and shift every dropout mask after it
        generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
               dynamic_ncols=True, desc="train")
    log_sums: dict[str, float] = {}
    n_logged = 0
    t_last, samples_since = time.perf_counter(), 0
    micro = 0
    finished, timed_out = step >= cfg.steps, False
    if clock is not None:
        clock.start()
    t_ready = time.perf_counter()
    for batch in loader:
        log_sums["data_wait_s"] = log_sums.get("data_wait_s", 0.0) + time.perf_counter() - t_ready
        with accelerator.accumulate(model):
            losses = model(batch)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and cfg.clip_grad:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                if grad_norm is not None:  # DeepSpeed clips inside its engine and returns None
                    log_sums["grad_norm"] = log_sums.get("grad_norm", 0.0) + float(grad_norm) * cfg.grad_accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "attr_loss", "name_loss", "token_name_loss",
                  "position_loss", "iou_loss", "object_loss"):
            if k in losses:
                log_sums[k] = log_sums.get(k, 0.0) + float(losses[k].detach())
        n_logged += 1
        samples_since += cfg.batch_size * accelerator.num_processes
        micro += 1
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        bar.update(1)
        timed_out = clock is not None and _agree(accelerator, clock.up())
        if step % cfg.log_every == 0 or step == cfg.steps or timed_out:
            now = time.perf_counter()
            rec = {"step": step, **{k: round(v / n_logged, 6) for k, v in log_sums.items()},
                   "lr": scheduler.get_last_lr()[0], "samples_per_s": samples_since / max(now - t_last, 1e-9)}
            bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce_loss']:.3f}",
                            samples_s=f"{rec['samples_per_s']:.1f}")
            if accelerator.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            log_sums, n_logged, t_last, samples_since = {}, 0, now, 0
        finished = step == cfg.steps or timed_out
        stopping = cfg.stop_at is not None and step >= cfg.stop_at
        if step % cfg.save_every == 0 or finished or stopping:
            _save_checkpoint(accelerator, out, step, cfg.keep_checkpoints,
                             None if clock is None else clock.elapsed())
            if accelerator.is_main_process:
                plot_losses(out / "metrics.jsonl", out / "loss.png")
        if stopping or timed_out:
            break
        t_ready = time.perf_counter()
    bar.close()
    torch.set_num_threads(threads)
    accelerator.wait_for_everyone()
    if cfg.export and finished:
        if timed_out and accelerator.is_main_process:
            print(f"--time-limit {cfg.time_limit:g} min reached at step {step} of {cfg.steps}", flush=True)
        _export(accelerator, model, cfg, out / "final")
    accelerator.end_training()
    return out


def _vision_stage(cfg: TrainConfig, model, accelerator, out: Path) -> None:
    """Pretrain the vision tower on the shapes world (train/vision_pretrain.py) and record what it reached. Every
    process runs the same seeded stage; DDP then starts from rank 0's weights."""
    from .vision_pretrain import pretrain_vision, write_result

    if cfg.vision_pretrain_steps < 0 or cfg.vision_pretrain_batch < 1 or cfg.vision_pretrain_images < 1:
        raise InputError(f"--vision-pretrain-steps/-batch/-images: expected steps >= 0 and batch, images >= 1, got "
                         f"{cfg.vision_pretrain_steps}/{cfg.vision_pretrain_batch}/{cfg.vision_pretrain_images}")
    if "shapes" not in cfg.dataset.split("||"):
        raise InputError(f"--vision-pretrain-steps: the stage learns from the shapes world, but --dataset is "
                         f"{cfg.dataset!r}; add shapes or set --vision-pretrain-steps 0")
    if not (hasattr(model, "vlm") or hasattr(model, "grounding_encoder")):
        raise InputError(f"--vision-pretrain-steps: for LISA/GLaMM models (a CLIP vision tower) and Sa2VA models "
                         f"(SAM2's image encoder); {cfg.model} has neither")
    if cfg.vision_pretrain_region_weight and not hasattr(model, "encode_regions"):
        raise InputError(f"--vision-pretrain-region-weight {cfg.vision_pretrain_region_weight}: {cfg.model} has no "
                         "region encoder (GLaMM models have one)")
    result = pretrain_vision(model, cfg.vision_pretrain_steps, cfg.vision_pretrain_batch, cfg.vision_pretrain_lr,
                             cfg.vision_pretrain_images, cfg.shapes_seed, cfg.shapes_image_size,
                             device=accelerator.device, log=print if accelerator.is_main_process else None,
                             # where the pretrained tower is the one the LLM reads (CLIP), it keeps positions too
                             position_weight=cfg.token_position_weight if hasattr(model, "vlm") else 0.0,
                             region_weight=cfg.vision_pretrain_region_weight)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_result(result, out / "vision_pretrain.json")


def _export(accelerator, model, cfg: TrainConfig, dest: Path) -> None:
    """Merge LoRA and write the model in our format. Under FSDP the parameters are sharded, so the full state
    dict is gathered on rank 0 and loaded into a fresh copy of the same structure first."""
    from accelerate.utils import DistributedType

    from ..hub import save_pretrained

    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            final, _ = build_for_training(cfg)
            if cfg.attribute_weight:  # drop the training-only probes
                state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            final.load_state_dict(state)
    else:
        final = accelerator.unwrap_model(model)
        final = getattr(final, "model", final) if cfg.attribute_weight else final
    if accelerator.is_main_process:
        merge_lora(final)
        save_pretrained(final.eval(), dest)
    accelerator.wait_for_everyone()


def _worker_context() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn`` (Windows)."""
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _quiet_worker(_: int) -> None:
    """DataLoader worker start: one OpenCV thread (torch already runs one per worker), so that the workers do not
    oversubscribe the cores the training process needs."""
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(1)


def _trim_metrics(path: Path, step: int) -> None:
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor ..." warning: the only shared tensors of our models are tied word
    embeddings, which every model re-ties when it is built, so a resumed run gets them back (tested)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


def _agree(accelerator, flag: bool) -> bool:
    """One decision for every process (the main process's), so that all of them stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(broadcast(t, from_process=0).item())


def _save_checkpoint(accelerator, out: Path, step: int, keep: int, elapsed: float | None = None) -> None:
    d = out / "checkpoints" / f"step_{step:06d}"
    accelerator.save_state(str(d))
    accelerator.wait_for_everyone()  # every rank's shards and RNG states are on disk before the marker
    if accelerator.is_main_process:
        # trainer_state.json is written last: a checkpoint without it is incomplete and ignored by --resume.
        state = {"step": step} if elapsed is None else {"step": step, "elapsed_s": round(elapsed, 3)}
        (d / "trainer_state.json").write_text(json.dumps(state))
        for old in sorted((out / "checkpoints").glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def plot_losses(metrics: Path, png: Path, keys: tuple[str, ...] = ("loss", "ce_loss", "mask_bce_loss",
                                                                    "mask_dice_loss")) -> None:
    """Draw the loss curves of ``metrics.jsonl`` into a PNG (log-scale y), with OpenCV only."""
    import cv2
    import numpy as np

    from ..io import atomic_write

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    w, h, left, right, top, bottom = 900, 500, 70, 170, 30, 50
    img = np.full((h, w, 3), 255, np.uint8)
    steps = np.array([r["step"] for r in rows], float)
    rows = [r for r in rows if all(math.isfinite(r.get(k, 0.0)) for k in keys)]  # a NaN step is not drawn
    if not rows:
        return
    vals = {k: np.array([max(r[k], 1e-6) for r in rows]) for k in keys if k in rows[0]}
    lo = math.log10(min(v.min() for v in vals.values()))
    hi = math.log10(max(v.max() for v in vals.values()))
    lo, hi = math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2 + (1e-9 if hi == lo else 0)
    sx = lambda s: int(left + (s - steps.min()) / max(1e-9, steps.max() - steps.min()) * (w - left - right))
    sy = lambda v: int(h - bottom - (math.log10(v) - lo) / max(1e-9, hi - lo) * (h - top - bottom))
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    for e in np.arange(lo, hi + 1e-9, 0.5):
        y = sy(10 ** e)
        cv2.line(img, (left, y), (w - right, y), (225, 225, 225), 1)
        cv2.putText(img, f"{10 ** e:.3g}", (5, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for s in np.linspace(steps.min(), steps.max(), 5):
        cv2.putText(img, f"{int(s)}", (sx(s) - 10, h - bottom + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(img, "step", (w // 2 - 40, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    colours = [(40, 40, 200), (200, 90, 30), (40, 160, 40), (160, 40, 160)]
    for i, (k, v) in enumerate(vals.items()):
        pts = np.array([[sx(s), sy(y)] for s, y in zip(steps, v)], np.int32)
        cv2.polylines(img, [pts], False, colours[i % 4], 2, cv2.LINE_AA)
        cv2.putText(img, k, (w - right + 10, top + 20 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colours[i % 4], 1,
                    cv2.LINE_AA)
    with atomic_write(png) as tmp:
        cv2.imwrite(str(tmp), img)
