"""Tracking speed: groundseg's streamed SAM2 memory vs the ``sam2`` package's own ``propagate_in_video``, same
frames, same weights, one run.

    python bench/track.py [--video ../shared/fixtures/media/bedroom.mp4] [--frames 40] [--size 256|1024]
                          [--device cpu|cuda]

Both pipelines track one object from a prompt on frame 0 through the first ``--frames`` frames of the video
(written once as ``<n>.jpg`` files, the input ``init_state`` takes), with the same SAM2 (the ``sa2va-tiny``
preset's architecture, random weights, at ``--size`` pixels: both run its Sa2VA flags, so the per-frame work is
the same memory attention, heads and memory encoder). The package's pipeline loads and keeps every frame in its
state before tracking (``init_state``), then yields masks; groundseg decodes one frame at a time, keeps the
conditioning frames plus the last 15 tracked frames' memory, and yields masks as it goes. The table gives wall times,
frames per second and the frame images each holds at once. The two start from different prompts (a box for the
package, a language embedding for groundseg) -- one frame of 40, so the rates compare the tracking itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(REPO.parent / "shared" / "fixtures" / "media" / "bedroom.mp4"))
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=256, help="SAM2 input size (the releases use 1024)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each pipeline, alternating; best kept")
    args = ap.parse_args()

    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from groundseg.config import SA2VA_PRESETS
    from groundseg.decoders.sam2 import SA2VA_OVERRIDES, Sam2Decoder
    from groundseg.video import open_video

    device = torch.device(args.device)
    cfg = SA2VA_PRESETS["sa2va-tiny"]().sam2
    cfg.overrides = [o for o in cfg.overrides if "image_size" not in o] + [f"++model.image_size={args.size}"]
    torch.manual_seed(0)
    ours = Sam2Decoder(cfg).to(device).eval()
    theirs = build_sam2_video_predictor(cfg.config_file, ckpt_path=None, device=str(device),
                                        hydra_overrides_extra=list(cfg.overrides) + list(SA2VA_OVERRIDES),
                                        apply_postprocessing=False)
    theirs.load_state_dict(ours.sam2_model.state_dict())
    theirs.eval()

    src = open_video(args.video, max_frames=args.frames)
    h, w = src.size
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for i, rgb in src:  # the package reads a folder of <int>.jpg
            Image.fromarray(rgb).save(Path(tmp) / f"{i}.jpg", quality=95)
        n = src.num_frames

        def run_package():
            sync(device)
            t0 = time.perf_counter()
            state = theirs.init_state(tmp)  # loads every frame
            held = len(state["images"])
            sync(device)
            t1 = time.perf_counter()
            box = np.array([w * 0.3, h * 0.3, w * 0.7, h * 0.7])
            theirs.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=box)
            count = 0
            for _, _, masks in theirs.propagate_in_video(state):
                _ = (masks[0, 0] > 0).cpu()
                count += 1
            sync(device)
            return count, t1 - t0, time.perf_counter() - t1, held

        def run_ours(video):
            source = open_video(video, max_frames=n)
            sync(device)
            t0 = time.perf_counter()
            memory = ours.new_memory(1)
            language = torch.randn(1, ours.sam2_model.sam_prompt_embed_dim, device=device)
            count = 0
            for idx, rgb in source:  # decoded one at a time
                feats = ours.encode(ours.preprocess(rgb)[None].to(device))
                out = ours.add_condition(memory, 0, feats, language) if idx == 0 else ours.track(memory, idx, feats)
                _ = (ours.postprocess(out.low_res_masks, (h, w))[0, 0] > 0).cpu()
                count += 1
            sync(device)
            return count, 0.0, time.perf_counter() - t0, 1

        pipelines = {"sam2 init_state + propagate_in_video": run_package,
                     "groundseg streamed (JPEG folder)": lambda: run_ours(tmp),
                     "groundseg streamed (MP4)": lambda: run_ours(args.video)}
        best: dict[str, tuple] = {}
        for _ in range(args.repeats):  # alternate, so that a busy machine slows every pipeline alike
            for label, fn in pipelines.items():
                r = fn()
                if label not in best or r[1] + r[2] < best[label][1] + best[label][2]:
                    best[label] = r
        rows = [(label, *r) for label, r in best.items()]

    print(f"device {device}, SAM2 {args.size}px (sa2va-tiny architecture), {n} frames of {Path(args.video).name} "
          f"({w}x{h}), torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'pipeline':40s} {'frames':>6s} {'load s':>7s} {'track s':>8s} {'frames/s':>9s} {'frames held':>12s}")
    for label, count, load, track, held in rows:
        print(f"{label:40s} {count:6d} {load:7.2f} {track:8.2f} {count / (load + track):9.2f} {held:12d}")


if __name__ == "__main__":
    main()
