"""Latency of `segment`: per image, and per extra prompt on the same image (the image is encoded once).

    python bench/segment.py [--model lisa-tiny] [--image examples/dog.jpg] [--prompts 4] [--repeats 3]

Prints one table per device (CPU, and CUDA when present): the naive path runs `segment` once per prompt (image
encoded for every prompt); the batched path passes all prompts together (one CLIP + one SAM encode, one
generation batch, one decoder call). Generation length is fixed so both paths do the same token work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from groundseg import load_model

PROMPTS = ["the dog", "the bench", "the grass on the left", "the shadow under the dog", "the background",
           "the dog's head", "the path", "the tree"]


def fixed_length(model, n_tokens: int) -> None:
    """Generate exactly n_tokens ending in [SEG] so timings do not depend on random weights."""
    vocab = model.config.llm["vocab_size"]
    seq = [model.tokenizer.convert_tokens_to_ids("a")] * (n_tokens - 2) + [model.seg_token_id, model.eos_id]
    real = model.vlm.logits
    state = {"i": 0}

    def logits(h):
        real(h)  # keep the lm_head cost in the timing
        out = torch.full((*h.shape[:-1], vocab), -1e4, device=h.device)
        out[..., seq[min(state["i"], len(seq) - 1)]] = 0
        state["i"] += 1
        return out

    def reset():
        state["i"] = 0

    model.vlm.logits = logits
    return reset


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lisa-tiny")
    ap.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples" / "dog.jpg"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    prompts = PROMPTS[:args.prompts]
    for device, dtype in devices:
        model = load_model(args.model).to(device=device, dtype=dtype)
        reset = fixed_length(model, args.tokens)

        def one(p):
            reset()
            return model.segment(args.image, p)

        def naive():
            for p in prompts:
                one(p)

        def batched():
            reset()
            model.segment(args.image, prompts)

        t1 = timeit(lambda: one(prompts[0]), args.repeats)
        tn = timeit(naive, args.repeats)
        tb = timeit(batched, args.repeats)
        extra = (tb - t1) / max(len(prompts) - 1, 1)
        print(f"\n{args.model} on {device} ({str(dtype).removeprefix('torch.')}), {len(prompts)} prompts, "
              f"{args.tokens} generated tokens each")
        print(f"{'path':<34}{'total ms':>10}{'ms/prompt':>11}{'speed-up':>10}")
        print(f"{'one prompt (image + prompt)':<34}{t1 * 1e3:>10.1f}{t1 * 1e3:>11.1f}{'':>10}")
        print(f"{'naive: segment() per prompt':<34}{tn * 1e3:>10.1f}{tn / len(prompts) * 1e3:>11.1f}{1.0:>9.2f}x")
        print(f"{'batched: one segment() call':<34}{tb * 1e3:>10.1f}{tb / len(prompts) * 1e3:>11.1f}"
              f"{tn / tb:>9.2f}x")
        print(f"{'each extra prompt (batched)':<34}{'':>10}{extra * 1e3:>11.1f}")


if __name__ == "__main__":
    main()
