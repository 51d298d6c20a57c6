"""Training-step cost of a recipe: data (one core) and model (forward + backward + AdamW), per precision.

    python bench/train_step.py [--preset sa2va-shapes] [--batch-size 16] [--video-frames 16] [--device cuda]
                               [--steps 2]

The recipe's model is built from scratch, the recipe's data source makes ``--steps + 1`` micro-batches in this
process (the time per batch is what one DataLoader worker spends), the first batch warms up, and the others are
timed in fp32 and, on a GPU, under bf16 autocast. The table gives seconds per step and samples per second;
``data_s_per_batch`` divided by ``--num-workers`` is the data loader's share. The ratio column is each row against
fp32 in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from groundseg.train.data import Collator, build_source
    from groundseg.train.trainer import RECIPES, TrainConfig, _Batches, build_for_training

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sa2va-shapes", choices=sorted(RECIPES))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--video-frames", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    recipe = dict(RECIPES[args.preset])
    if args.batch_size:
        recipe["batch_size"] = args.batch_size
    if args.video_frames:
        recipe["shapes_video_frames"] = args.video_frames
    cfg = TrainConfig(**recipe)
    model, _ = build_for_training(cfg)
    if cfg.attribute_weight:
        from groundseg.train.probes import ProbedModel

        model = ProbedModel(model, cfg.attribute_weight, cfg.token_attribute_weight)
    dev = torch.device(args.device)
    model = model.to(dev).train()
    base = getattr(model, "model", model)
    collator = base.collator() if hasattr(base, "collator") else Collator(base.config, base.tokenizer)
    source = build_source(cfg.dataset, cfg.sample_rates, cfg.shapes_seed, shapes_tasks=cfg.shapes_tasks,
                          image_size=cfg.shapes_image_size, max_expressions=cfg.shapes_max_expressions,
                          video_frames=cfg.shapes_video_frames)
    batches = _Batches(source, collator, cfg.batch_size, 0, 1, 0, args.steps + 1)
    t = time.perf_counter()
    data = [batches[i] for i in range(args.steps + 1)]
    data_s = (time.perf_counter() - t) / len(data)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for prec in ("fp32", "bf16") if dev.type == "cuda" else ("fp32",):
        def step(b) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = model(b)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(data[0])
        sync()
        t = time.perf_counter()
        for b in data[1:]:
            step(b)
        sync()
        rows.append((prec, (time.perf_counter() - t) / args.steps))
    print(f"preset {args.preset}, batch {cfg.batch_size}, device {dev}, data_s_per_batch {data_s:.3f} (one core)")
    print(f"{'precision':>10} {'s/step':>8} {'samples/s':>10} {'ratio':>6}")
    for prec, s in rows:
        print(f"{prec:>10} {s:8.3f} {cfg.batch_size / s:10.1f} {rows[0][1] / s:6.2f}")


if __name__ == "__main__":
    main()
