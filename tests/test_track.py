"""Streaming video input, the track writers, and ``groundseg track`` end to end on the tiny preset."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from groundseg.cli import main
from groundseg.io import InputError, rle_to_mask
from groundseg.video import (FolderFrames, TrackWriter, VideoFileFrames, davis_palette, label_map, open_video,
                             read_label_png, save_label_png)

BEDROOM_FRAMES, BEDROOM_FPS, BEDROOM_SIZE = 200, 30.0, (540, 960)


def _write_frames(folder, n=6, size=(40, 56), ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for t in range(n):
        rgb = np.full((*size, 3), 30, np.uint8)
        rgb[5:15, 4 + 5 * t:14 + 5 * t] = (250, 40, 40)  # a red square moving right
        Image.fromarray(rgb).save(folder / f"{t}{ext}")  # 10.png after 9.png: natural order
        frames.append(rgb)
    return frames


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------- reading

def test_folder_frames_are_decoded_one_at_a_time(tmp_path):
    frames = _write_frames(tmp_path / "f", n=12)
    src = open_video(tmp_path / "f")
    assert isinstance(src, FolderFrames) and src.num_frames == 12 and src.size == (40, 56)
    assert src.decoded == 0  # opening reads headers only
    it = iter(src)
    idx, rgb = next(it)
    assert (idx, src.decoded) == (0, 1)
    assert np.array_equal(rgb, frames[0])
    next(it)
    assert src.decoded == 2
    # natural name order: 2.png before 10.png
    assert [p.name for p in src.files[:3]] == ["0.png", "1.png", "2.png"] and src.files[10].name == "10.png"
    assert [i for i, _ in src.read([7, 3, 99])] == [3, 7]


def test_mp4_frames_stream_and_skip_without_decoding(media):
    src = open_video(media / "bedroom.mp4")
    assert isinstance(src, VideoFileFrames)
    assert (src.num_frames, src.fps, src.size) == (BEDROOM_FRAMES, BEDROOM_FPS, BEDROOM_SIZE)
    it = iter(src)
    next(it)
    assert src.decoded == 1
    keys = dict(src.read([0, 50, 199]))
    assert sorted(keys) == [0, 50, 199] and src.decoded == 4  # 3 decoded; the 196 frames between only grabbed
    assert keys[199].shape == (540, 960, 3)


def _mp4(path, n=12, size=(32, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (size[1], size[0]))
    for t in range(n):
        frame = np.full((*size, 3), 20 * t % 256, np.uint8)
        writer.write(frame)
    writer.release()
    return path


class _OverCountingCapture:
    """cv2.VideoCapture whose header claims 3 frames more than the file decodes (some muxers do that)."""

    real = cv2.VideoCapture

    def __init__(self, *args):
        self.cap = self.real(*args)

    def get(self, prop):
        value = self.cap.get(prop)
        return value + 3 if prop == cv2.CAP_PROP_FRAME_COUNT else value

    def __getattr__(self, name):
        return getattr(self.cap, name)


@pytest.mark.parametrize("stride", [1, 2])
def test_uniform_key_frames_survive_a_header_that_over_counts(tmp_path, monkeypatch, stride):
    from groundseg.grounding.sa2va import read_key_frames

    path = _mp4(tmp_path / "v.mp4", n=12)
    monkeypatch.setattr(cv2, "VideoCapture", _OverCountingCapture)
    src = open_video(path, stride=stride)
    assert src.num_frames == len(range(0, 15, stride))  # what the header says
    keys, rgb = read_key_frames(src, "uniform", 4)
    real = len(range(0, 12, stride))
    assert src.num_frames == real and keys[0] == 0 and keys[-1] == real - 1 and len(keys) == 4
    assert sorted(rgb) == keys
    assert [i for i, _ in src] == list(range(real))
    # a start past the real end (though inside the header's count) is a one-line error when the video is opened
    with pytest.raises(InputError, match="--start 13: .* ends before frame 13"):
        open_video(path, start=13)


def test_selection_start_stride_max_frames(tmp_path):
    frames = _write_frames(tmp_path / "f", n=10)
    src = open_video(tmp_path / "f", start=2, stride=3, max_frames=2)
    assert src.num_frames == 2 and [src.frame_number(i) for i in range(2)] == [2, 5]
    got = list(src)
    assert [i for i, _ in got] == [0, 1]
    assert np.array_equal(got[1][1], frames[5])
    assert open_video(tmp_path / "f", start=9).num_frames == 1
    with pytest.raises(InputError, match="--start 10: .* has only 10 frames"):
        open_video(tmp_path / "f", start=10)


def test_frame_size_change_is_found_before_reading(tmp_path):
    _write_frames(tmp_path / "f", n=4)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "f" / "2.png")
    with pytest.raises(InputError, match=r"2\.png: frame is 30x30 but 0\.png is 56x40"):
        open_video(tmp_path / "f")


# ------------------------------------------------------------------------------------------- writing

def test_label_map_gives_each_pixel_its_strongest_object():
    logits = np.full((3, 2, 4), -5.0, np.float32)
    logits[0, 0, :2] = 1.0
    logits[1, 0, 1:3] = 2.0  # overlaps object 1 at (0, 1) and wins there
    logits[2, 1, 3] = 0.5
    assert label_map(logits).tolist() == [[1, 2, 2, 0], [0, 0, 0, 3]]
    assert label_map(np.zeros((0, 2, 2))).tolist() == [[0, 0], [0, 0]]


def test_label_png_round_trip_with_davis_palette(tmp_path):
    labels = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    save_label_png(tmp_path / "x.png", labels)
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode == "P"
        pal = im.getpalette()
    assert pal[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]  # DAVIS: black, dark red, green, olive
    assert pal == davis_palette()[:len(pal)]
    assert np.array_equal(read_label_png(tmp_path / "x.png"), labels)


def test_track_writer_round_trip(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    logits = np.full((2, 6, 8), -3.0, np.float32)
    logits[0, 1:3, 1:4] = 2.0
    logits[1, 4:6, 5:8] = 0.0  # exactly 0 is background
    logits[1, 4:6, 6:8] = 4.0
    with TrackWriter(tmp_path / "o", ["a", "b"], fps=12.0, size=(6, 8)) as w:
        w.write(7, rgb, logits)
        w.write(9, rgb, np.full((2, 6, 8), -1.0, np.float32))
        # frame records are on disk as they come, not held in memory until the end
        w._records.flush()
        (records,) = (tmp_path / "o").glob(".track.*.jsonl")
        assert [json.loads(x)["frame"] for x in records.read_text().splitlines()] == [7, 9]
    doc = json.loads((tmp_path / "o" / "track.json").read_text())
    assert doc["num_frames"] == 2 and [f["frame"] for f in doc["frames"]] == [7, 9]
    assert doc["prompts"] == ["a", "b"] and doc["fps"] == 12.0 and doc["size"] == [6, 8]
    f0 = doc["frames"][0]
    assert f0["frame"] == 7 and [o["id"] for o in f0["objects"]] == [1, 2]
    m0 = rle_to_mask(f0["objects"][0]["segmentation"])
    assert m0.sum() == 6 and m0[1:3, 1:4].all()
    assert f0["objects"][0]["box"] == [1.0, 1.0, 4.0, 3.0]
    assert f0["objects"][0]["score"] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-4)
    assert f0["objects"][1]["box"] == [6.0, 4.0, 8.0, 6.0]
    assert doc["frames"][1]["objects"][0]["box"] is None and doc["frames"][1]["objects"][0]["score"] == 0.0
    png = read_label_png(tmp_path / "o" / "masks" / "00007.png")
    assert np.array_equal(png == 1, m0) and np.array_equal(png == 2, rle_to_mask(f0["objects"][1]["segmentation"]))
    cap = cv2.VideoCapture(str(tmp_path / "o" / "overlay.mp4"))
    assert cap.get(cv2.CAP_PROP_FPS) == 12.0 and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    cap.release()
    assert not list((tmp_path / "o").glob(".*"))  # no temp files left


# ------------------------------------------------------------------------------------------- the command

def test_track_cli_on_bedroom_mp4(tmp_path, media, capsys):
    code, out, err = _run(capsys, "track", str(media / "bedroom.mp4"), "-p", "the bed", "-p", "the lamp",
                          "--max-frames", "3", "--start", "10", "--answer", "Sure, [SEG].",
                          "--out", str(tmp_path / "o"), "--model", "sa2va-tiny")
    assert code == 0, err
    assert "the bed: Sure, [SEG]." in out and "wrote 3 frames" in out and "frames/s" in out
    assert "frame/s" in err  # the progress bar's rate
    o = tmp_path / "o"
    assert sorted(p.name for p in (o / "masks").iterdir()) == ["00010.png", "00011.png", "00012.png"]
    doc = json.loads((o / "track.json").read_text())
    assert doc["num_frames"] == 3 and doc["fps"] == BEDROOM_FPS and doc["size"] == list(BEDROOM_SIZE)
    assert doc["key_frames"] == [10, 11, 12] and doc["answers"] == ["Sure, [SEG]."] * 2
    for f in doc["frames"]:
        labels = read_label_png(o / "masks" / f"{f['frame']:05d}.png")
        assert labels.shape == BEDROOM_SIZE and set(np.unique(labels)) <= {0, 1, 2}
        for obj in f["objects"]:  # the PNG and the RLE say the same thing, object id = prompt order
            assert np.array_equal(labels == obj["id"], rle_to_mask(obj["segmentation"]))
        assert [o_["prompt"] for o_ in f["objects"]] == ["the bed", "the lamp"]
    cap = cv2.VideoCapture(str(o / "overlay.mp4"))
    assert cap.get(cv2.CAP_PROP_FPS) == BEDROOM_FPS and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (960, 540)
    cap.release()


def test_track_cli_on_a_folder_of_frames_uniform_key_frames(tmp_path, capsys):
    _write_frames(tmp_path / "frames", n=5, ext=".jpg")
    code, out, err = _run(capsys, "track", str(tmp_path / "frames"), "-p", "the red square", "--answer",
                          "Sure, [SEG].", "--key-frames", "uniform", "--num-key-frames", "3",
                          "--out", str(tmp_path / "o"), "--model", "sa2va-tiny")
    assert code == 0, err
    doc = json.loads((tmp_path / "o" / "track.json").read_text())
    assert doc["key_frames"] == [0, 2, 4] and doc["num_frames"] == 5
    assert len(list((tmp_path / "o" / "masks").glob("*.png"))) == 5


@pytest.mark.parametrize("case", ["missing", "not_video", "empty", "start", "size", "zero_stride"])
def test_track_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, media, case):
    video = {"missing": tmp_path / "nope.mp4", "not_video": tmp_path / "x.mp4", "empty": tmp_path / "empty",
             "start": media / "bedroom.mp4", "size": tmp_path / "f", "zero_stride": media / "bedroom.mp4"}[case]
    (tmp_path / "x.mp4").write_text("not a video")
    (tmp_path / "empty").mkdir()
    _write_frames(tmp_path / "f", n=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "f" / "1.png")
    extra = {"start": ["--start", "200"], "zero_stride": ["--stride", "0"]}.get(case, [])
    code, out, err = _run(capsys, "track", str(video), "-p", "x", "--out", str(tmp_path / "o"), *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("groundseg: error: ") and "Traceback" not in err
    expected = {"missing": "no such video", "not_video": "not a readable video", "empty": "no JPEG/PNG frames",
                "start": "--start 200: .* has only 200 frames", "size": "1.png: frame is 8x8",
                "zero_stride": "--stride 0: expected at least 1"}[case]
    assert __import__("re").search(expected, err), err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_track_in_another_dtype():
    """The model cast to another float dtype tracks: SAM2's prompt encoder stays float32 and the FPN's float32 output
    is brought to the model's dtype. float64 takes the same code path as bf16/fp16 (any dtype but float32) and is
    fast on a CPU, where bf16 convolutions are not."""
    import torch

    from groundseg.hub import load_model

    model = load_model("sa2va-tiny", dtype=torch.float64)
    pe = model.grounding_encoder.sam2_model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert pe.dtype == torch.float32 and model.grounding_encoder.dtype == torch.float64
    frames = [np.random.RandomState(i).randint(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(3)]
    out = list(model.track(frames, ["a", "b"], answer="Sure, [SEG].", num_key_frames=1))
    assert [f.index for f in out] == [0, 1, 2] and [f.key_frame for f in out] == [True, False, False]
    assert out[-1].logits.shape == (2, 24, 32) and bool(torch.isfinite(out[-1].logits).all())


def test_generated_answers_are_shown_without_the_end_of_turn_word():
    from groundseg.tracking import _shown

    assert _shown("Sure, the star[SEG].<|im_end|>", ("<|im_end|>", "<|endoftext|>")) == "Sure, the star[SEG]."
    assert _shown("Sure, [SEG].", ("<|im_end|>",)) == "Sure, [SEG]."


def test_the_shipped_sa2va_shapes_tracks_a_held_out_shapes_video(tmp_path, capsys):
    # The default model (trained sa2va-shapes) on a test video of another seed than it was trained on: each object
    # named by its attributes is followed through all 16 frames, the orange shape through leaving the frame and
    # coming back (its masks are empty while it is out).
    from groundseg.datasets.shapes import ShapesWorld
    from groundseg.tracking import default_track_model

    assert default_track_model() == "sa2va-shapes"
    video = ShapesWorld(seed=1, image_size=256).video(180, 16)
    (tmp_path / "frames").mkdir()
    for t, f in enumerate(video.frames):
        Image.fromarray(f).save(tmp_path / "frames" / f"{t:05d}.png")
    ids = {e.text: e.targets[0] for e in video.expressions if e.kind == "attribute"}
    prompts = ["the blue triangle", "the star", "the orange shape"]
    assert video.reentering == [ids["the orange shape"]]
    code, out, err = _run(capsys, "track", str(tmp_path / "frames"), *sum((["-p", p] for p in prompts), []),
                          "--out", str(tmp_path / "o"))
    assert code == 0, err
    for p in prompts:
        assert f"{p}: Sure, {p}[SEG].\n" in out  # the name copied; no <|im_end|> shown
    doc = json.loads((tmp_path / "o" / "track.json").read_text())
    assert doc["model"] == "sa2va-shapes" and doc["answers"] == [f"Sure, {p}[SEG]." for p in prompts]
    for k, p in enumerate(prompts, start=1):
        gt = video.masks[ids[p]]
        pred = np.stack([np.asarray(Image.open(tmp_path / "o" / "masks" / f"{t:05d}.png")) == k for t in range(16)])
        union = (pred | gt).sum((1, 2))
        j = np.where(union > 0, (pred & gt).sum((1, 2)) / np.maximum(union, 1), 1.0)
        assert j.mean() > 0.5, (p, j.round(2))
        if p == "the orange shape":
            out_of_frame = ~gt.any((1, 2))
            assert out_of_frame.any() and not pred[out_of_frame].any()
