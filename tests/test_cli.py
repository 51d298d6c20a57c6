"""`groundseg segment` / `convert`: the files it writes and its one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import groundseg.hub
from groundseg.cli import main
from groundseg.io import rle_to_mask

from test_segment import script


def use_tiny(monkeypatch, answer: str | None = None, **attrs) -> None:
    """Make the CLI load the tiny preset, optionally scripted to give ``answer``, with ``attrs`` set on it."""
    real = groundseg.hub.load_model

    def load(name=None, **kw):
        m = real("lisa-tiny")
        if answer is not None:
            script(m, answer)
        for k, v in attrs.items():
            setattr(m, k, v)
        return m

    monkeypatch.setattr(groundseg.hub, "load_model", load)


@pytest.fixture()
def scripted(monkeypatch):
    """The tiny preset answering 'Sure, [SEG] and [SEG].' for every image."""
    use_tiny(monkeypatch, "Sure, [SEG] and [SEG].")


def test_segment_writes_json_masks_and_overlay(scripted, media, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(media / "dog.jpg"), "--prompt", "the dog", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dog.jpg: Sure, [SEG] and [SEG]." in printed
    data = json.loads((out / "dog.json").read_text())
    assert data["text"] == "Sure, [SEG] and [SEG]." and len(data["masks"]) == 2
    for k, entry in enumerate(data["masks"]):
        mask = rle_to_mask(entry["segmentation"])
        png = np.asarray(Image.open(out / f"dog_mask{k}.png"))
        assert mask.shape == png.shape == (534, 800)
        assert np.array_equal(mask, png == 255) and set(np.unique(png)) <= {0, 255}
        ys, xs = np.nonzero(mask)
        if len(xs):
            assert entry["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                     int(ys.max() - ys.min() + 1)]
        assert 0.0 <= entry["score"] <= 1.0
    overlay = Image.open(out / "dog_overlay.jpg")
    assert overlay.size == (800, 534)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_no_seg_answer_says_so(monkeypatch, media, tmp_path, capsys):
    use_tiny(monkeypatch, "No.")
    assert main(["segment", str(media / "dog.jpg"), "-p", "a unicorn", "-o", str(tmp_path)]) == 0
    assert "no [SEG] in the answer" in capsys.readouterr().out
    assert json.loads((tmp_path / "dog.json").read_text())["masks"] == []


def assert_rejected(args, capsys, expect: str, out) -> None:
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("groundseg: error: ") and expect in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_bad_inputs_exit_2_without_output(media, tmp_path, capsys):
    out = tmp_path / "never"
    dog = str(media / "dog.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text("{}")
    assert_rejected(["segment", str(tmp_path / "missing.jpg"), "-p", "x"], capsys, "image not found", out)
    assert_rejected(["segment", str(tmp_path / "notes.txt"), "-p", "x"], capsys, "not a readable image", out)
    assert_rejected(["segment", dog, "-p", " "], capsys, "--prompt is empty", out)
    assert_rejected(["segment", dog, "-p", "x", "--answer", "Sure."], capsys,
                    "--answer 'Sure.': expected a [SEG] (or a <box>) in the fixed answer", out)
    assert_rejected(["segment", dog, "-p", "x", "--model", "lisa-999b"], capsys, "unknown model 'lisa-999b'", out)
    assert_rejected(["segment", dog, "-p", "x", "--model", str(tmp_path / "empty")], capsys, "not a checkpoint folder", out)
    assert_rejected(["segment", dog, "-p", "x", "--model", str(tmp_path / "weird")], capsys, "neither a groundseg config", out)
    assert_rejected(["segment", dog, "-p", "x", "--box", "1,2,3"], capsys, "expected four numbers", out)
    assert_rejected(["segment", dog, "-p", "x", "--box", "10,10,5,20"], capsys, "x1 < x2", out)
    assert_rejected(["segment", dog, "-p", "x", "--box", "0,0,900,100"], capsys, "no region encoder", out)
    assert_rejected(["segment", dog, "-p", "x", "--dtype", "fp8"], capsys, "invalid choice", out)
    assert_rejected(["segment", "-p", "x"], capsys, "required", out)


def test_box_outside_image_is_rejected_for_region_models(monkeypatch, media, tmp_path, capsys):
    use_tiny(monkeypatch, supports_regions=True)  # stands in for a family with a region encoder
    assert_rejected(["segment", str(media / "dog.jpg"), "-p", "x", "--box", "0,0,900,100"], capsys,
        "lies outside", tmp_path / "o")


def test_checkpoint_with_missing_tensors_exits_2(tmp_path, capsys, media):
    from groundseg import load_model, save_pretrained
    from safetensors.torch import load_file, save_file

    folder = save_pretrained(load_model("lisa-tiny"), tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("seg_projector.text_hidden_fcs.0.0.bias")
    save_file(state, str(folder / "model.safetensors"))
    assert_rejected(["segment", str(media / "dog.jpg"), "-p", "x", "--model", str(folder)], capsys,
        "1 missing tensor(s): seg_projector.text_hidden_fcs.0.0.bias", tmp_path / "o")


def test_convert_official_checkpoint(official_lisa_dir, tmp_path, capsys):
    assert main(["convert", str(official_lisa_dir), str(tmp_path / "conv")]) == 0
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["family"] == "lisa" and cfg["tokenization"] == "lisa" and cfg["sam"]["image_size"] == 64


def test_console_script_runs(tmp_path, media):
    """The installed entry point, in a fresh process, on a real photo with the default model."""
    r = subprocess.run([sys.executable, "-m", "groundseg", "segment", str(media / "truck.jpg"), "-p", "the truck",
                        "--out", str(tmp_path), "--max-new-tokens", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "truck.json").is_file() and (tmp_path / "truck_overlay.jpg").is_file()
    r = subprocess.run([sys.executable, "-m", "groundseg", "segment", "nope.jpg", "-p", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "groundseg: error: image not found: nope.jpg"


def test_fixed_answer_is_teacher_forced(monkeypatch, media, tmp_path, capsys):
    # --answer: no generation; the answer is the template with the prompt in it, one mask per [SEG]
    use_tiny(monkeypatch)
    assert main(["segment", str(media / "dog.jpg"), "-p", "the dog", "--answer", "Sure, {} [SEG] and [SEG].",
                 "-o", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(": Sure, the dog [SEG] and [SEG].")
    data = json.loads((tmp_path / "dog.json").read_text())
    assert data["text"] == "Sure, the dog [SEG] and [SEG]." and len(data["masks"]) == 2
