"""The ``groundseg`` command.

``groundseg segment IMAGE... --prompt TEXT`` writes, per image, ``<stem>.json`` (answer text and COCO-RLE masks),
``<stem>_mask<k>.png`` and ``<stem>_overlay.jpg`` into ``--out``, and prints each answer.
``groundseg convert SRC DST`` writes an official checkpoint in groundseg's format.
``groundseg train [--preset NAME] ...`` trains (see ``groundseg/train/``); ``groundseg data shapes --out DIR``
writes the procedural shapes world in the REFER and Ref-YouTube-VOS formats.

User mistakes (missing files, bad values, unknown models) print one line ``groundseg: error: ...`` and exit with
status 2; every input is checked before anything is written, and every file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .io import InputError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise InputError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="groundseg", description="Language-guided grounding and segmentation (LISA, GLaMM, Sa2VA).")
    p.add_argument("--version", action="version", version=f"groundseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("segment", help="segment what a sentence refers to in one or more images")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--prompt", "-p", default=None, help="what to segment, e.g. 'the dog on the left' (with --box: "
                                                        "one <bbox> per box, e.g. 'What is in <bbox>?')")
    s.add_argument("--gcg", action="store_true",
                   help="grounded conversation generation (GLaMM): the model's standard GCG prompt; each phrase of "
                        "the caption gets its own mask, colour and legend entry")
    s.add_argument("--model", "-m", default=None, help="preset name or checkpoint folder (default: %(default)s "
                                                       "= the shipped default model)")
    s.add_argument("--out", "-o", default="out", help="output folder (default: %(default)s)")
    s.add_argument("--box", action="append", default=[], metavar="x1,y1,x2,y2",
                   help="region prompt in pixels (families with a region encoder); repeatable")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--answer", default=None, metavar="TEXT",
                   help="fix the answer instead of generating it (LISA's teacher-forced evaluation path); '{}' "
                        "stands for the prompt, e.g. 'Sure, {} [SEG].'")
    s.add_argument("--batch-size", type=int, default=4, help="images per batch (default: %(default)s)")
    s.add_argument("--vision-tower", default=None, help="CLIP folder or hub id for official LISA checkpoints")

    k = sub.add_parser("track", help="follow what each prompt names through a video (Sa2VA models)")
    from .tracking import add_arguments as add_track_arguments

    add_track_arguments(k)

    t = sub.add_parser("train", help="train or fine-tune (LoRA) a model; see groundseg/train/trainer.py")
    from .train.cli import add_arguments

    add_arguments(t)

    e = sub.add_parser("eval", help="evaluate a model on a benchmark and print the field's metrics")
    e.add_argument("task", choices=["refer", "reasonseg", "rec", "boxes", "gcg", "regcap", "video"],
                   help="refer: referring segmentation (cIoU, gIoU, Prec@X); reasonseg: ReasonSeg (the same "
                        "metrics); rec (alias boxes): box grounding (Acc@0.5); gcg: grounded conversation "
                        "generation on GranD-f-format files (AP50, mIoU, mask recall, METEOR, CIDEr); regcap: "
                        "region captions (METEOR, CIDEr); video: referring video segmentation (J&F) on "
                        "Ref-YouTube-VOS, MeViS, ReVOS or Ref-DAVIS17 (--format)")
    e.add_argument("--data-root", required=True,
                   help="refer/rec: folder holding the REFER dataset folders and images/; reasonseg: folder "
                        "holding ReasonSeg/<split>/ (or reason_seg/ReasonSeg/<split>/, or <split>/)")
    e.add_argument("--format", default=None, choices=["refytvos", "mevis", "revos", "refdavis"],
                   help="video: the dataset layout (see groundseg/eval/video.py); --predictions is then a folder "
                        "of PRED/<video>/<exp_id>/<frame>.png masks")
    e.add_argument("--dataset", default=None, help="refcoco, refcoco+, refcocog, refclef, shapes or any REFER-format "
                                                   "folder under --data-root")
    e.add_argument("--split-by", default=None, help="unc, umd, google (default: the only refs file present)")
    e.add_argument("--split", default=None, help="val, testA, testB, test, ... (default: val; for video the "
                                                 "format's validation split: valid, or valid_u for mevis)")
    e.add_argument("--image-dir", default=None, help="image folder (default: DATA_ROOT/images)")
    e.add_argument("--model", "-m", default=None, help="preset or checkpoint folder (default: the shipped default "
                                                       "model)")
    e.add_argument("--protocol", choices=["teacher-forced", "generate"], default=None,
                   help="teacher-forced (default): LISA's fixed '[SEG].' answer; generate: the model answers")
    e.add_argument("--mode", choices=["teacher", "chat"], default=None,
                   help="older spelling of --protocol: teacher = teacher-forced, chat = generate")
    e.add_argument("--batch-size", type=int, default=16, help="expressions per forward (default: %(default)s)")
    e.add_argument("--limit", type=int, default=None, help="first N images only")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/predictions.jsonl (as it goes), DIR/report.json and DIR/iou_hist.png")
    e.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    e.add_argument("--predictions", default=None, metavar="FILE",
                   help="score this file (JSONL or JSON list of {sent_id, segmentation: RLE}; rec: {sent_id, box: "
                        "[x1, y1, x2, y2] pixels or null}) without a model")
    e.add_argument("--text-encoder", default=None, metavar="DIR|words",
                   help="gcg: local transformers text encoder for mask recall's phrase similarity (officially "
                        "bert-base-uncased), or 'words' for an offline bag-of-words cosine; without it recall is "
                        "not computed")
    e.add_argument("--max-new-tokens", type=int, default=None, help="gcg/regcap: generation length (default 512 / "
                                                                     "128)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")

    d = sub.add_parser("data", help="write datasets to disk")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    ds = dsub.add_parser("shapes", help="the procedural shapes world in REFER and Ref-YouTube-VOS formats")
    ds.add_argument("--out", required=True, help="output folder (gets shapes/, images/, videos/)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--images", type=int, default=100)
    ds.add_argument("--videos", type=int, default=0)
    ds.add_argument("--image-size", type=int, default=256)

    c = sub.add_parser("convert", help="write a checkpoint (official LISA layout or preset) in groundseg's format")
    c.add_argument("source", help="official checkpoint folder, groundseg folder or preset")
    c.add_argument("dest", help="output folder")
    c.add_argument("--vision-tower", default=None, help="CLIP folder or hub id (official LISA checkpoints)")
    return p


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4:
        raise InputError(f"--box {text!r}: expected four numbers x1,y1,x2,y2 in pixels")
    x1, y1, x2, y2 = vals
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"--box {text!r}: expected x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _image_size(path: str) -> tuple[int, int]:
    """(h, w) after EXIF orientation, from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return h, w


def _device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected cpu, cuda or cuda:N")


def cmd_segment(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .hub import load_model
    from .io import check_image

    if args.gcg and args.prompt is not None:
        raise InputError("--gcg uses the model's standard grounded-caption prompt: drop --prompt")
    if args.prompt is None and not args.gcg:
        raise InputError("--prompt is required (or --gcg for a grounded caption)")
    if args.gcg and args.box:
        raise InputError("--gcg captions the whole image and takes no --box; to ask about a region, give --box "
                         "with --prompt 'What is in <bbox>?'")
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty: expected a sentence describing what to segment")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError("--max-new-tokens and --batch-size must be at least 1")
    if args.answer is not None and "[SEG]" not in args.answer and "<box>" not in args.answer:
        raise InputError(f"--answer {args.answer!r}: expected a [SEG] (or a <box>) in the fixed answer, "
                         "e.g. 'Sure, {} [SEG].'")
    for path in args.images:
        check_image(path)
    stems = [Path(p).stem for p in args.images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise InputError(f"two images share the file name stem {dupes[0]!r}; their outputs would overwrite "
                         "each other")
    boxes = [_parse_box(b) for b in args.box]
    device = _device(args.device)
    model = load_model(args.model, vision_tower=args.vision_tower)
    if boxes and not getattr(model, "supports_regions", False):
        raise InputError(f"--box: the {model.family} family has no region encoder, so it cannot take box "
                         "prompts; use a GLaMM model")
    if args.gcg and not getattr(model.config, "gcg_prompt", None):
        raise InputError(f"--gcg: the {model.family} family has no grounded conversation generation; use a GLaMM "
                         "model")
    prompt = model.config.gcg_prompt if args.gcg else args.prompt
    for path in args.images:
        h, w = _image_size(path)
        for b in boxes:
            if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
                raise InputError(f"--box {','.join(f'{v:g}' for v in b)} lies outside {path} ({w}x{h} pixels)")
    n_bbox = prompt.count("<bbox>")
    if n_bbox != len(boxes) and (boxes or getattr(model, "supports_regions", False)):
        raise InputError(f"--prompt has {n_bbox} <bbox> placeholder(s) but {len(boxes)} --box given: write one "
                         "<bbox> per box, in box order, e.g. --prompt 'What is in <bbox>?'")
    model.to(device=device, dtype=getattr(torch, DTYPES[args.dtype]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(args.images), unit="img", disable=len(args.images) <= 1, file=sys.stderr)
    for start in range(0, len(args.images), args.batch_size):
        batch = args.images[start:start + args.batch_size]
        results = model.segment(batch, prompt, max_new_tokens=args.max_new_tokens,
                                **({"boxes": boxes} if boxes else {}), **({"answer": args.answer}
                                                                            if args.answer is not None else {}))
        for path, res in zip(batch, results):
            write_result(out, Path(path), res, gcg=args.gcg)
            note = "" if len(res) else "  (no [SEG] in the answer: no mask)"
            tqdm.write(f"{path}: {res.text}{note}", file=sys.stdout)
        bar.update(len(batch))
    bar.close()
    return 0


def write_result(out: Path, path: Path, res, gcg: bool = False) -> None:
    """<stem>.json, <stem>_mask<k>.png, <stem>_overlay.jpg for one Result. ``gcg``: every mask entry names its
    phrase (null when the answer gave it none), the JSON adds the clean ``caption``, and the overlay gets a legend
    mapping each colour to its phrase."""
    from .io import load_image, mask_to_bbox, mask_to_rle, overlay, save_jpeg, save_json, save_png_mask

    masks = []
    for k, m in enumerate(res.masks):
        entry = {"segmentation": mask_to_rle(m), "score": round(float(res.scores[k]), 4), "bbox": mask_to_bbox(m),
                 "source": res.sources[k] if k < len(res.sources) else "seg"}
        if k < len(res.phrases) and res.phrases[k] or gcg:
            entry = {"phrase": res.phrases[k] if k < len(res.phrases) else None, **entry}
        masks.append(entry)
        save_png_mask(out / f"{path.stem}_mask{k}.png", m)
    doc = {"image": str(path), "text": res.text, "masks": masks}
    if gcg:
        from .grounding.glamm import clean_caption, gcg_overlay

        doc = {"image": str(path), "text": res.text, "caption": clean_caption(res.text), "masks": masks}
        save_jpeg(out / f"{path.stem}_overlay.jpg", gcg_overlay(load_image(path), res.masks, res.phrases, res.text))
    else:
        save_jpeg(out / f"{path.stem}_overlay.jpg", overlay(load_image(path), res.masks, res.text,
                                                           phrases=res.phrases or None))
    save_json(out / f"{path.stem}.json", doc)


def cmd_convert(args: argparse.Namespace) -> int:
    from .hub import load_model, save_pretrained

    model = load_model(args.source, vision_tower=args.vision_tower)
    dest = save_pretrained(model, args.dest)
    print(f"wrote {dest}")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from .tracking import run

    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .eval.metrics import format_table
    from .eval.runner import protocol_name

    if args.split is None:
        args.split = {"mevis": "valid_u"}.get(args.format, "valid") if args.task == "video" else "val"
    if args.task == "video":
        from .eval.video import run_cli

        return run_cli(args)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: expected at least 1")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: expected at least 1")
    if args.resume and not args.out:
        raise InputError("--resume needs --out, the folder of the run to continue")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    if args.out and Path(args.out).suffix == ".json" and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out}: expected a folder (it gets predictions.jsonl, report.json and "
                         "iou_hist.png)")
    protocol = protocol_name(args.protocol, args.mode)
    task = "rec" if args.task == "boxes" else args.task
    if task == "rec" and (args.protocol or args.mode):
        raise InputError("--protocol/--mode: box grounding always generates")
    if not Path(args.data_root).is_dir():  # before loading a model, which can take minutes
        raise InputError(f"--data-root {args.data_root}: folder not found")
    if not args.predictions:
        from .eval.report import check_out
        from .hub import default_model

        check_out(args.out, args.resume, args.model or default_model())
    if task in ("gcg", "regcap"):
        return _eval_captioning(task, args)
    if args.predictions:
        if args.model or args.resume or args.protocol or args.mode:
            raise InputError("--predictions scores a file without a model: drop --model, --protocol and --resume")
        report = _score_predictions(task, args)
    else:
        from .hub import default_model, load_model

        device = _launched_device() or _device(args.device)
        model = load_model(args.model, device=device, dtype=getattr(torch, DTYPES[args.dtype]))
        common = dict(data_root=args.data_root, split=args.split, limit=args.limit, progress=sys.stderr.isatty(),
                      batch_size=args.batch_size, out=args.out, resume=args.resume,
                      model_name=args.model or default_model())
        if task == "refer":
            from .eval.refer import evaluate_refer

            report = evaluate_refer(model, dataset=args.dataset, split_by=args.split_by, image_dir=args.image_dir,
                                    protocol=protocol, **common)
        elif task == "reasonseg":
            from .eval.reasonseg import evaluate_reasonseg

            report = evaluate_reasonseg(model, protocol=protocol, **common)
        else:
            from .eval.refer import evaluate_boxes

            report = evaluate_boxes(model, dataset=args.dataset, split_by=args.split_by, image_dir=args.image_dir,
                                    **common)
    from .eval.report import dist_info

    if dist_info()[0] != 0:
        return 0
    if task == "rec":
        print(format_table(report.metrics, columns=("Acc@0.5", "mIoU", "n")))
        if report.report.get("missing"):
            print(f"{report.report['missing']} of {report.report['num_expressions']} sentences had no box "
                  "(scored as IoU 0)")
    else:
        print(format_table(report.metrics))
        if report.report.get("missing"):
            print(f"{report.report['missing']} of {report.report['num_expressions']} sentences had no prediction "
                  "(scored as empty masks)")
    if args.out:
        print(f"wrote {Path(args.out) / 'report.json'}")
    return 0


def _eval_captioning(task: str, args: argparse.Namespace) -> int:
    """``eval gcg`` / ``eval regcap`` (groundseg/eval/gcg.py)."""
    import torch

    from .eval.gcg import evaluate_gcg, evaluate_regcap
    from .hub import default_model, load_model

    if args.predictions or args.protocol or args.mode:
        raise InputError(f"eval {task}: --predictions, --protocol and --mode apply to refer/reasonseg only")
    if args.text_encoder and task != "gcg":
        raise InputError("--text-encoder is for eval gcg (mask recall)")
    if args.text_encoder and args.text_encoder != "words" and not Path(args.text_encoder).is_dir():
        raise InputError(f"--text-encoder {args.text_encoder}: folder not found")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    from .eval.gcg import GT_CAPTION_FILE, GT_MASK_FILE, REGCAP_FILE

    needed = ([GT_MASK_FILE, GT_CAPTION_FILE] if task == "gcg" else [args.dataset or REGCAP_FILE])
    for name in needed:  # before loading a model, which can take minutes
        f = Path(args.data_root) / name.format(split=args.split)
        if not f.is_file():
            raise InputError(f"eval {task}: {f} not found (expected GranD-f-format files in --data-root)")
    model = load_model(args.model, device=_device(args.device), dtype=getattr(torch, DTYPES[args.dtype]))
    common = dict(data_root=args.data_root, split=args.split, image_dir=args.image_dir, limit=args.limit,
                  out=args.out, resume=args.resume, progress=sys.stderr.isatty(),
                  model_name=args.model or default_model())
    if args.max_new_tokens:
        common["max_new_tokens"] = args.max_new_tokens
    if task == "gcg":
        report = evaluate_gcg(model, text_encoder=args.text_encoder, **common)
        cols = ("AP50", "mIoU", "recall", "METEOR", "CIDEr")
        n = report["num_images"]
    else:
        report = evaluate_regcap(model, dataset=args.dataset, **common)
        cols = ("METEOR", "CIDEr", "exact_match")
        n = report["num_regions"]
    fmt = lambda v: "-" if v is None or v != v else f"{100 * v:.1f}"  # noqa: E731
    print("  ".join(f"{c:>7}" for c in (*cols, "n")))
    print("  ".join(f"{fmt(report[c]):>7}" for c in cols) + f"  {n:>7}")
    if report.get("caption_metrics_error"):
        print(f"METEOR/CIDEr not computed: {report['caption_metrics_error']}")
    if task == "gcg":
        print(f"mask recall text encoder: {report['recall_text_encoder'] or 'none (pass --text-encoder DIR or words)'}")
    if args.out:
        print(f"wrote {Path(args.out) / 'report.json'}")
    return 0


def _launched_device():
    """Under ``accelerate launch`` with several processes: set up the process group and return this process's
    device (each evaluates a share of the images, see groundseg/eval/runner.py); else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState().device


def _score_predictions(task: str, args: argparse.Namespace):
    if task in ("refer", "rec"):
        from .eval.refer import score_box_predictions, score_refer_predictions

        score = score_refer_predictions if task == "refer" else score_box_predictions
        return score(args.predictions, args.data_root, args.dataset, args.split_by, args.split, limit=args.limit,
                     out=args.out)
    from .eval.reasonseg import score_reasonseg_predictions

    return score_reasonseg_predictions(args.predictions, args.data_root, args.split, limit=args.limit, out=args.out)


def cmd_data(args: argparse.Namespace) -> int:
    from .datasets.shapes import write_shapes

    if args.images < 0 or args.videos < 0:
        raise InputError("--images and --videos must be >= 0")
    if args.image_size < 64:
        raise InputError(f"--image-size {args.image_size}: expected at least 64")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    summary = write_shapes(args.out, seed=args.seed, images=args.images, videos=args.videos,
                           image_size=args.image_size)
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .hub import CheckpointError

    try:
        args = _parser().parse_args(argv)
        return {"segment": cmd_segment, "convert": cmd_convert, "train": cmd_train, "track": cmd_track,
                "data": cmd_data, "eval": cmd_eval}[args.command](args)
    except (InputError, CheckpointError) as e:
        print(f"groundseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
