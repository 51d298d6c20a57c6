"""Arguments of ``groundseg train`` (also ``accelerate launch -m groundseg.train``).

Values come, later winning, from: :class:`TrainConfig` defaults, the recipe named by ``--preset``, a JSON file
given with ``--config`` (e.g. a run's ``train_config.json``), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..io import InputError
from .trainer import RECIPES, TrainConfig


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"expected comma-separated numbers like 9,3,3,1, got {text!r}")


def _rates(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise InputError(f"--shapes-tasks: expected task=rate pairs like refer=6,box=2, got {text!r}")
    return out


def _object(value, path: Path) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"--config {path}: expected a JSON object of training options")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay unset, so presets and --config can fill them
    p.add_argument("--preset", choices=sorted(RECIPES), default=S,
                   help="a documented recipe (model, data and schedule), e.g. shapes-demo")
    p.add_argument("--config", default=S, help="JSON file of TrainConfig fields (e.g. a run's train_config.json)")
    p.add_argument("--out", default=S, help="run folder (checkpoints, metrics.jsonl, loss.png, final/)")
    p.add_argument("--model", default=S, help="preset, groundseg folder or official checkpoint to start from")
    p.add_argument("--from-scratch", action="store_true", default=S,
                   help="build the preset with seeded random weights")
    p.add_argument("--init-from", default=S,
                   help="a model (preset or folder) whose tensors of the same name and shape start the run")
    p.add_argument("--init-exclude", type=lambda t: t.split(","), default=S,
                   help="name prefixes --init-from does not copy, e.g. vlm.vision_tower.")
    p.add_argument("--vision-tower", default=S, help="CLIP folder (official LISA checkpoints)")
    p.add_argument("--dataset", default=S, help="datasets joined by '||', e.g. 'refer_seg||shapes'")
    p.add_argument("--sample-rates", type=_floats, default=S, help="one rate per dataset, e.g. 3,1")
    p.add_argument("--data-root", default=S, help="folder with REFER datasets (refcoco/, refcoco+/, images/)")
    p.add_argument("--image-dir", default=S, help="REFER images, e.g. coco/train2014 (default: DATA_ROOT/images)")
    p.add_argument("--refer-datasets", default=S, help="REFER datasets joined by '||' (default refcoco)")
    p.add_argument("--shapes-tasks", type=_rates, default=S, help="shapes task rates, e.g. refer=6,multi=2,box=2")
    p.add_argument("--shapes-image-size", type=int, default=S, help="side of generated shapes images (pixels)")
    p.add_argument("--shapes-max-expressions", type=int, default=S, help="expressions per image per sample")
    p.add_argument("--shapes-video-frames", type=int, default=S, help="frames per video sample (task video)")
    p.add_argument("--shapes-kinds", type=lambda t: t.split(","), default=S,
                   help="expression kinds of referring and video questions, e.g. attribute (default: all)")
    p.add_argument("--steps", type=int, default=S, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=S, help="images per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=S, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--warmup-steps", type=int, default=S)
    p.add_argument("--clip-grad", type=float, default=S, help="max gradient norm (0 = off)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=S,
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--no-lora", dest="lora", action="store_false", default=S, help="train without adapters")
    p.add_argument("--lora-r", type=int, default=S)
    p.add_argument("--lora-alpha", type=int, default=S)
    p.add_argument("--lora-dropout", type=float, default=S)
    p.add_argument("--lora-targets", type=lambda t: t.split(","), default=S, help="e.g. q_proj,v_proj")
    p.add_argument("--trainable", type=lambda t: t.split(","), default=S,
                   help="name parts trained in full (default lm_head,embed_tokens,mask_decoder,text_hidden_fcs)")
    p.add_argument("--frozen", type=lambda t: t.split(","), default=S, help="name parts always frozen")
    p.add_argument("--train-all", action="store_true", default=S, help="train every parameter")
    p.add_argument("--ce-weight", type=float, default=S)
    p.add_argument("--bce-weight", type=float, default=S)
    p.add_argument("--dice-weight", type=float, default=S)
    p.add_argument("--attribute-weight", type=float, default=S,
                   help="auxiliary colour/shape/size probes on SAM's embedding and the [SEG] prompts (shapes data)")
    p.add_argument("--token-attribute-weight", type=float, default=S,
                   help="the attribute probes on the image tokens the LLM reads (with --attribute-weight)")
    p.add_argument("--region-attribute-weight", type=float, default=S,
                   help="the attribute probes on GLaMM's region vectors (with --attribute-weight)")
    p.add_argument("--token-position-weight", type=float, default=S,
                   help="a probe that reads each image token's row and column back (with --attribute-weight)")
    p.add_argument("--name-weight", type=float, default=S,
                   help="GLaMM: pull each region vector to the LLM's embedding of its object's (one-token) name")
    p.add_argument("--token-name-weight", type=float, default=S,
                   help="GLaMM: turn image tokens on objects towards the embedding of their object's name")
    p.add_argument("--vision-pretrain-steps", type=int, default=S,
                   help="first train the vision tower alone on the shapes world's colour/shape/size labels (0 = off)")
    p.add_argument("--vision-pretrain-batch", type=int, default=S, help="images per step of that stage")
    p.add_argument("--vision-pretrain-lr", type=float, default=S)
    p.add_argument("--vision-pretrain-region-weight", type=float, default=S,
                   help="GLaMM: the stage also trains the region encoder (box vectors pulled to name embeddings)")
    p.add_argument("--vision-pretrain-images", type=int, default=S, help="distinct images that stage cycles through")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--save-every", type=int, default=S)
    p.add_argument("--log-every", type=int, default=S)
    p.add_argument("--num-workers", type=int, default=S, help="DataLoader worker processes")
    p.add_argument("--device", choices=["cpu", "cuda"], default=S, help="default: cuda when present")
    p.add_argument("--stop-at", type=int, default=S, help="stop after this step (with a checkpoint)")
    p.add_argument("--time-limit", type=float, default=S, metavar="MINUTES",
                   help="end the run (exported) after this many minutes of training; the learning rate decays "
                        "with time or steps, whichever is further along")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    given = vars(args)
    if "preset" in given:
        values.update(RECIPES[given["preset"]])
    if "config" in given:
        path = Path(given["config"])
        try:
            values = {**values, **_object(json.loads(path.read_text()), path)}
        except FileNotFoundError:
            raise InputError(f"--config {path}: no such file")
        except json.JSONDecodeError as e:
            raise InputError(f"--config {path}: not valid JSON ({e})")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown training option(s) {unknown}")
    values.update({k: v for k, v in given.items() if k in known})
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    cfg = config_from_args(args)
    out = train(cfg, resume=args.resume)
    print(f"run folder: {out}" + (f"; model: {out / 'final'}" if (out / "final").is_dir() else ""))
    return 0
