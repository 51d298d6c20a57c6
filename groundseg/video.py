"""Videos in and out, one frame at a time.

Reading: :func:`open_video` gives a :class:`FrameSource` over an MP4 (or anything OpenCV decodes) or a folder of
JPEG/PNG frames. Frames are decoded lazily, one per step of the iteration, so holding a source costs one frame of
memory whatever the video's length; :meth:`FrameSource.read` picks a few frames (the key frames) by streaming past
the others. ``start``/``stride``/``max_frames`` select a sub-sequence; indices are positions in that selection and
:meth:`FrameSource.frame_number` maps them back to the file.

Writing: :class:`TrackWriter` writes, as frames arrive, ``masks/<frame:05d>.png`` (palette PNG, DAVIS colours,
pixel value = object id = prompt order, 0 = background), ``overlay.mp4`` at the input's frame rate, and at the end
``track.json`` (per frame and object: COCO RLE, score, box). Every file appears under its name only when complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from .io import InputError, _json_default, atomic_write, mask_to_rle, masks_to_boxes_xyxy, overlay

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_FPS = 24.0


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name.lower())]


class FrameSource:
    """Frames of one video, decoded on demand. Iterating yields ``(index, rgb)`` with rgb (H, W, 3) uint8.

    Use :func:`open_video` to make one. ``num_frames`` counts the selected frames, ``fps`` is the selection's
    rate (the file's rate / stride), ``size`` is (H, W) of the first selected frame; every frame must share it."""

    def __init__(self, name: str, total: int, fps: float, start: int = 0, stride: int = 1,
                 max_frames: int | None = None):
        if start < 0:
            raise InputError(f"--start {start}: expected 0 or more")
        if stride < 1:
            raise InputError(f"--stride {stride}: expected at least 1")
        if max_frames is not None and max_frames < 1:
            raise InputError(f"--max-frames {max_frames}: expected at least 1")
        if start >= total:
            raise InputError(f"--start {start}: {name} has only {total} frame{'s' if total != 1 else ''}")
        self.name = name
        self.start, self.stride, self.max_frames = start, stride, max_frames
        self._set_total(total)
        self.fps = fps / stride
        self.size: tuple[int, int] = (0, 0)
        self.decoded = 0  # frames decoded so far (tests check that reading is lazy)

    def _set_total(self, total: int) -> None:
        self.total = total
        n = len(range(self.start, total, self.stride))
        self.num_frames = min(n, self.max_frames) if self.max_frames is not None else n

    def recount(self) -> int:
        """Make ``num_frames`` exact and return it. Only a video file's count can be wrong (it comes from the
        container's header, which can claim more frames than decode); the other sources count their frames."""
        return self.num_frames

    def frame_number(self, index: int) -> int:
        """The frame's number in the file (0-based) for a position in the selection."""
        return self.start + index * self.stride

    # subclasses: _frames(numbers) yields (number, rgb) for increasing file frame numbers
    def _frames(self, numbers: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def _checked(self, number: int, rgb: np.ndarray) -> np.ndarray:
        self.decoded += 1
        if rgb.shape[:2] != self.size:
            raise InputError(f"{self.name}: frame {number} is {rgb.shape[1]}x{rgb.shape[0]} but the first frame is "
                             f"{self.size[1]}x{self.size[0]}; every frame must have the same size")
        return rgb

    def read(self, indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """The frames at these selection positions, in increasing order (one pass over the file)."""
        wanted = sorted({int(i) for i in indices if 0 <= int(i) < self.num_frames})
        by_number = {self.frame_number(i): i for i in wanted}
        for number, rgb in self._frames(sorted(by_number)):
            yield by_number[number], self._checked(number, rgb)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.read(range(self.num_frames))

    def __len__(self) -> int:
        return self.num_frames


class FileFrames(FrameSource):
    """A list of JPEG/PNG frame files, in the given order. Every frame's header is read when the source is made,
    so a frame of another size is an error before anything is decoded or written."""

    def __init__(self, files: Sequence[Path], name: str, **select):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise InputError(f"{name}: no JPEG/PNG frames")
        super().__init__(name, len(self.files), DEFAULT_FPS, **select)
        sizes = {}
        for i in range(self.num_frames):
            path = self.files[self.frame_number(i)]
            try:
                with Image.open(path) as im:
                    sizes[path] = (im.height, im.width)
            except Exception as e:
                raise InputError(f"{path}: not a readable image ({type(e).__name__})")
        first = self.files[self.frame_number(0)]
        self.size = sizes[first]
        for path, hw in sizes.items():
            if hw != self.size:
                raise InputError(f"{path}: frame is {hw[1]}x{hw[0]} but {first.name} is {self.size[1]}x"
                                 f"{self.size[0]}; every frame must have the same size")

    def _frames(self, numbers):
        for n in numbers:
            bgr = cv2.imread(str(self.files[n]), cv2.IMREAD_COLOR)
            if bgr is None:
                raise InputError(f"{self.files[n]}: not a readable image")
            yield n, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FolderFrames(FileFrames):
    """A folder of JPEG/PNG frames, in natural name order (``2.jpg`` before ``10.jpg``)."""

    def __init__(self, folder: Path, **select):
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and p.is_file()),
                       key=_natural_key)
        if not files:
            raise InputError(f"{folder}: no JPEG/PNG frames in the folder")
        super().__init__(files, str(folder), **select)


def _grab_all(cap) -> int:
    """How many frames ``cap`` still has, counted by grabbing them (no decoding)."""
    n = 0
    while cap.grab():
        n += 1
    return n


class VideoFileFrames(FrameSource):
    """A video file decoded by OpenCV (MP4 and whatever else its FFmpeg reads)."""

    def __init__(self, path: Path, **select):
        cap = cv2.VideoCapture(str(path))
        try:
            ok, first = cap.read() if cap.isOpened() else (False, None)
            if not ok or first is None:
                raise InputError(f"{path}: not a readable video (expected an MP4 or a folder of JPEG/PNG frames)")
            fps = cap.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if total <= 0:  # no count in the header: count the rest by grabbing
                total = 1 + _grab_all(cap)
        finally:
            cap.release()
        self.path = path
        super().__init__(str(path), total, fps if fps > 0 else DEFAULT_FPS, **select)
        self.size = first.shape[:2] if self.start == 0 else self._size_at(self.start)

    def recount(self) -> int:
        """Count the frames that really decode (grabbing, no decoding) and correct ``num_frames`` to match."""
        cap = cv2.VideoCapture(str(self.path))
        try:
            self._set_total(_grab_all(cap))
        finally:
            cap.release()
        return self.num_frames

    def _size_at(self, number: int) -> tuple[int, int]:
        for _, rgb in self._frames([number]):
            return rgb.shape[:2]
        raise InputError(f"--start {self.start}: {self.name} ends before frame {number}")

    def _frames(self, numbers):
        if not numbers:
            return
        cap = cv2.VideoCapture(str(self.path))
        try:
            n = 0
            for target in numbers:
                while n < target:  # skip without decoding
                    if not cap.grab():
                        return
                    n += 1
                ok, bgr = cap.read()
                if not ok:
                    return
                n += 1
                yield target, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()


class ArrayFrames(FrameSource):
    """Frames already in memory (a list of (H, W, 3) uint8 arrays): for tests and the Python API."""

    def __init__(self, frames: Sequence[np.ndarray], fps: float = DEFAULT_FPS, name: str = "<frames>", **select):
        if len(frames) == 0:
            raise InputError(f"{name}: no frames")
        self.frames = frames
        super().__init__(name, len(frames), fps, **select)
        self.size = tuple(np.asarray(frames[self.start]).shape[:2])

    def _frames(self, numbers):
        for n in numbers:
            yield n, np.asarray(self.frames[n], dtype=np.uint8)


def open_video(video, start: int = 0, max_frames: int | None = None, stride: int = 1) -> FrameSource:
    """A :class:`FrameSource` for an MP4 path, a folder of JPEG/PNG frames, a list of arrays, or a source (the
    selection arguments then must be left at their defaults)."""
    select = dict(start=start, max_frames=max_frames, stride=stride)
    if isinstance(video, FrameSource):
        return video
    if isinstance(video, (list, tuple)):
        return ArrayFrames(video, **select)
    path = Path(video)
    if not path.exists():
        raise InputError(f"{path}: no such video file or frame folder")
    if path.is_dir():
        return FolderFrames(path, **select)
    return VideoFileFrames(path, **select)


# ------------------------------------------------------------------------------------------- writing

def davis_palette() -> list[int]:
    """The 256-colour DAVIS/PASCAL VOC palette, flattened RGB (index 1 dark red, 2 dark green, ...)."""
    from .datasets.shapes import _voc_palette

    return _voc_palette()


def label_map(logits: np.ndarray) -> np.ndarray:
    """(N, H, W) mask logits -> (H, W) uint8 labels: each pixel gets the id (1-based prompt order) of the object
    with the highest logit among those above 0, else 0."""
    logits = np.asarray(logits, dtype=np.float32)
    if len(logits) == 0:
        return np.zeros(logits.shape[1:], np.uint8)
    if len(logits) > 255:
        raise ValueError("at most 255 objects fit an 8-bit label map")
    best = logits.argmax(0)
    return np.where(logits.max(0) > 0, best + 1, 0).astype(np.uint8)


def save_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Atomically write (H, W) uint8 labels as a palette PNG with the DAVIS colours."""
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    img.putpalette(davis_palette())
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) labels of a palette/greyscale PNG (palette indices, not colours)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise InputError(f"{path}: expected a palette or greyscale PNG, got mode {img.mode}")
            return np.asarray(img).copy()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable PNG ({type(e).__name__})")


def read_binary_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) bool of a mask PNG made by any tool: palette or greyscale (non-zero index), 1-bit, 16/32-bit, RGB(A)
    (any non-zero colour channel; alpha ignored)."""
    try:
        with Image.open(path) as img:
            a = np.asarray(img)
    except Exception as e:
        raise InputError(f"{path}: not a readable PNG ({type(e).__name__})")
    if a.ndim == 3:  # LA, RGB, RGBA: the alpha channel is not the mask
        return (a[..., :-1] if a.shape[-1] in (2, 4) else a).any(-1)
    if a.ndim != 2:
        raise InputError(f"{path}: expected a 2-D mask image, got shape {a.shape}")
    return a != 0


class TrackWriter:
    """Writes a tracking run into ``out`` as frames arrive (see the module docstring); :meth:`close` finishes
    ``overlay.mp4`` and writes ``track.json``. Use as a context manager."""

    def __init__(self, out: str | os.PathLike, prompts: Sequence[str], fps: float, size: tuple[int, int],
                 info: dict | None = None, overlay_video: bool = True):
        self.out = Path(out)
        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        self.prompts = list(prompts)
        self.fps = float(fps)
        self.size = tuple(size)
        self.info = dict(info or {})
        # Frame records go to a hidden JSON-lines file as they come (memory stays flat however long the video);
        # close() streams them into track.json.
        self.num_frames = 0
        self._records_tmp = self.out / f".track.{os.getpid()}.jsonl"
        self._records = open(self._records_tmp, "w", encoding="utf-8")
        self._video = None
        self._video_tmp = self.out / f".overlay.{os.getpid()}.mp4"
        if overlay_video:
            h, w = self.size
            self._video = cv2.VideoWriter(str(self._video_tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._video.isOpened():
                raise InputError(f"{self.out}: cannot write overlay.mp4 (OpenCV has no mp4v encoder here)")

    def write(self, frame_number: int, rgb: np.ndarray, logits: np.ndarray, answer: str | None = None) -> None:
        """One frame: ``logits`` (N, H, W) for the N prompts."""
        logits = np.asarray(logits, dtype=np.float32)
        labels = label_map(logits)
        save_label_png(self.out / "masks" / f"{frame_number:05d}.png", labels)
        masks = np.stack([labels == k + 1 for k in range(len(logits))]) if len(logits) else \
            np.zeros((0, *labels.shape), bool)
        prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
        boxes = masks_to_boxes_xyxy(masks)
        objects = []
        for k, m in enumerate(masks):
            area = int(m.sum())
            objects.append({"id": k + 1, "prompt": self.prompts[k], "segmentation": mask_to_rle(m),
                            "score": round(float(prob[k][m].mean()) if area else 0.0, 4),
                            "box": [float(v) for v in boxes[k]] if area else None, "area": area})
        self._records.write(json.dumps({"frame": int(frame_number), "objects": objects}) + "\n")
        self.num_frames += 1
        if self._video is not None:
            shown = overlay(rgb, masks, answer, phrases=[p if masks[k].any() else None
                                                        for k, p in enumerate(self.prompts)])
            self._video.write(cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None
            os.replace(self._video_tmp, self.out / "overlay.mp4")
        self._records.close()
        head = {**self.info, "prompts": self.prompts, "fps": self.fps, "size": list(self.size),
                "num_frames": self.num_frames}
        with atomic_write(self.out / "track.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(head, indent=2, default=_json_default)[:-2] + ',\n  "frames": [')
            with open(self._records_tmp, encoding="utf-8") as records:
                for k, line in enumerate(records):
                    f.write(("," if k else "") + "\n    " + line.rstrip("\n"))
            f.write("\n  ]\n}\n")
        self._records_tmp.unlink()

    def abort(self) -> None:
        if not self._records.closed:
            self._records.close()
        self._records_tmp.unlink(missing_ok=True)
        if self._video is not None:
            self._video.release()
            self._video = None
        if self._video_tmp.exists():
            self._video_tmp.unlink()

    def __enter__(self) -> "TrackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
