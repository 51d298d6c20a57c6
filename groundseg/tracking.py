"""``groundseg track``: follow what each prompt names through a video and write masks as they come.

``groundseg track VIDEO --prompt TEXT [--prompt TEXT ...]`` reads an MP4 or a folder of JPEG/PNG frames one frame at
a time (:mod:`groundseg.video`), asks a Sa2VA model about the key frames, propagates the masks through SAM2's
memory, and writes ``OUT/masks/<frame:05d>.png`` (object k = prompt k), ``OUT/overlay.mp4`` and ``OUT/track.json``.
Every input is checked before the model loads; bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .io import InputError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_track_model() -> str:
    """``sa2va-shapes`` where its trained weights ship, else the random ``sa2va-tiny``."""
    from .grounding.sa2va_hub import ASSETS

    return "sa2va-shapes" if (ASSETS / "sa2va-shapes" / "model.safetensors").is_file() else "sa2va-tiny"


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("video", metavar="VIDEO", help="an MP4 (or any video OpenCV reads) or a folder of JPEG/PNG frames")
    t.add_argument("--prompt", "-p", action="append", required=True, metavar="TEXT",
                   help="what to follow, e.g. 'the dog'; repeat for several objects (object k = k-th prompt)")
    t.add_argument("--model", "-m", default=None, help="Sa2VA preset or checkpoint folder (default: sa2va-shapes "
                                                       "where shipped, else sa2va-tiny)")
    t.add_argument("--out", "-o", default="out", help="output folder (default: %(default)s)")
    t.add_argument("--key-frames", choices=["first", "uniform"], default=None,
                   help="frames the MLLM sees: the first N (as released) or N spread uniformly (default: the "
                        "model's, first)")
    t.add_argument("--num-key-frames", type=int, default=None, help="N above (default: the model's, 5)")
    t.add_argument("--start", type=int, default=0, help="first frame to read (default: %(default)s)")
    t.add_argument("--max-frames", type=int, default=None, help="read at most this many frames")
    t.add_argument("--stride", type=int, default=1, help="read every K-th frame (default: %(default)s)")
    t.add_argument("--answer", default=None, metavar="TEXT",
                   help="fix the MLLM's answer instead of generating it, e.g. 'Sure, [SEG].' ('{}' = the prompt)")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    t.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .cli import _device
    from .hub import load_model
    from .video import TrackWriter, open_video

    prompts = [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise InputError("--prompt is empty: expected a sentence describing what to follow")
    if args.num_key_frames is not None and args.num_key_frames < 1:
        raise InputError(f"--num-key-frames {args.num_key_frames}: expected at least 1")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    if args.answer is not None and "[SEG]" not in args.answer:
        raise InputError(f"--answer {args.answer!r}: expected a [SEG] in the fixed answer, e.g. 'Sure, [SEG].'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    source = open_video(args.video, start=args.start, max_frames=args.max_frames, stride=args.stride)
    device = _device(args.device)
    name = args.model or default_track_model()
    if args.model is None and name == "sa2va-tiny":
        print("note: no trained Sa2VA model ships yet, so this uses sa2va-tiny, whose weights are random: the masks "
              "show the plumbing, not tracking quality (pass --model with a Sa2VA checkpoint)", file=sys.stderr)
    model = load_model(name)
    if not hasattr(model, "track"):
        raise InputError(f"--model {name}: the {model.family} family cannot track videos; use a Sa2VA model "
                         "(e.g. sa2va-tiny, sa2va-4b)")
    model.to(device=device, dtype=getattr(torch, DTYPES[args.dtype]))

    groundings: list = []
    frames = model.track(source, prompts, key_frames=args.key_frames, num_key_frames=args.num_key_frames,
                         answer=args.answer, max_new_tokens=args.max_new_tokens, groundings=groundings)
    info = {"video": str(args.video), "model": name, "start": args.start, "stride": args.stride}
    bar = tqdm(total=source.num_frames, unit="frame", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    count = 0
    with bar, TrackWriter(out, prompts, source.fps, source.size, info=info) as writer:  # bar closed before an error
        for frame in frames:
            if count == 0:  # the key frames have been through the MLLM by now (and a wrong header count fixed)
                bar.total = source.num_frames
                bar.refresh()
                answers = [_shown(g.text, getattr(model, "stop_words", ())) for g in groundings]
                writer.info["answers"] = answers
                writer.info["key_frames"] = [source.frame_number(i) for i in _key_indices(model, source, args)]
                for p, g, a in zip(prompts, groundings, answers):
                    note = "" if len(g.seg_embeddings) else "  (no [SEG] in the answer: empty masks)"
                    tqdm.write(f"{p}: {a}{note}", file=sys.stdout)
            writer.write(source.frame_number(frame.index), frame.rgb, frame.logits.numpy())
            count += 1
            bar.update(1)
    seconds = time.perf_counter() - t0
    print(f"wrote {count} frames to {out} ({count / max(seconds, 1e-9):.2f} frames/s)")
    return 0


def _shown(text: str, stop_words) -> str:
    """A generated answer without the chat template's end-of-turn word it stopped at ("...[SEG].<|im_end|>")."""
    text = text.rstrip()
    for w in stop_words:
        if w and text.endswith(w):
            return text[: -len(w)].rstrip()
    return text


def _key_indices(model, source, args) -> list[int]:
    from .grounding.sa2va import select_key_frames

    return select_key_frames(source.num_frames, args.key_frames or model.config.key_frames,
                             args.num_key_frames or model.config.num_key_frames)
