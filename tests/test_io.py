"""Tests for groundseg.io: image loading, RLE/bbox helpers, atomic writes, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from groundseg.io import (
    InputError,
    atomic_write,
    check_image,
    load_image,
    mask_to_bbox,
    mask_to_rle,
    masks_to_boxes_xyxy,
    overlay,
    rle_to_mask,
    save_jpeg,
    save_json,
    save_png_mask,
)

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "media"


def _media(name: str) -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"fixture {path} not present (needs the shared fixtures checkout next to the repo)")
    return path


def _blocks(h: int = 24, w: int = 40) -> np.ndarray:
    """(H, W, 3) image of four flat colour quadrants, so orientation is unambiguous."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


# --------------------------------------------------------------------------- #
# load_image / check_image
# --------------------------------------------------------------------------- #


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_blocks(24, 40)).save(path, exif=exif, quality=95)

    out = load_image(path)

    assert out.shape == (40, 24, 3)
    with Image.open(path) as raw:  # the stored pixels, ignoring EXIF
        stored = np.asarray(raw.convert("RGB"))
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))
    # Clockwise: the stored top-left (red) ends at the top-right, the stored
    # bottom-left (blue) at the top-left. Tolerance covers JPEG error.
    np.testing.assert_allclose(out[3, -3], (255, 0, 0), atol=12)
    np.testing.assert_allclose(out[3, 3], (0, 0, 255), atol=12)


def test_grayscale_and_bilevel_png(tmp_path: Path) -> None:
    gray = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray > 100).save(tmp_path / "bilevel.png")  # mode "1"

    out = load_image(tmp_path / "gray.png")
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)
    np.testing.assert_array_equal(load_image(tmp_path / "bilevel.png")[:, :, 0], np.where(gray > 100, 255, 0))


def test_rgba_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")

    out = load_image(tmp_path / "rgba.png")

    # a=128: round(c * 128/255 + 255 * 127/255) -> 227, 177, 127
    np.testing.assert_array_equal(out[0], [[200, 100, 0], [255, 255, 255], [227, 177, 127]])
    np.testing.assert_array_equal(load_image(rgba), out)  # same rule for arrays


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.info["transparency"] = 1  # palette index 1 (green) is transparent
    img.save(tmp_path / "pal.png", transparency=1)

    out = load_image(tmp_path / "pal.png")

    np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 0, 0]]])


def test_16bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit decode path

    expected = [0, 1, 128, 255, 4]  # round(v / 257)
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png")[0, :, 0], expected)
    np.testing.assert_array_equal(load_image(values.astype(">u2"))[0, :, 1], expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(values.astype(np.int32)))[0, :, 2], expected)


def test_float_cmyk_and_array_inputs() -> None:
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(load_image(f)[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(load_image(Image.new("CMYK", (2, 1), (0, 0, 0, 0))), np.full((1, 2, 3), 255))

    rgb = _blocks()
    out = load_image(rgb)
    np.testing.assert_array_equal(out, rgb)
    out[:] = 0
    assert rgb.any(), "load_image must return a copy, not a view of the caller's array"
    np.testing.assert_array_equal(load_image(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2))


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 2, 3), np.uint8), np.full((2, 2), 300, np.int64)]
)
def test_bad_arrays_raise_input_error(bad: np.ndarray) -> None:
    with pytest.raises(InputError):
        load_image(bad)


def _assert_one_line(err: pytest.ExceptionInfo[InputError], *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    for fn in (load_image, check_image):
        with pytest.raises(InputError) as err:
            fn(path)
        _assert_one_line(err, "image not found", str(path))


def test_directory(tmp_path: Path) -> None:
    for fn in (load_image, check_image):
        with pytest.raises(InputError) as err:
            fn(tmp_path)
        _assert_one_line(err, str(tmp_path), "directory")


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG\nsecond line\n")
    for fn in (load_image, check_image):
        with pytest.raises(InputError) as err:
            fn(path)
        _assert_one_line(err, str(path), "is not a readable image")


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full, cut = tmp_path / "full.jpg", tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])

    check_image(full)  # a complete file passes
    for fn in (load_image, check_image):
        with pytest.raises(InputError) as err:
            fn(cut)
        _assert_one_line(err, str(cut), "is not a readable image", "truncated")


def test_real_fixture_images() -> None:
    dog = _media("dog.jpg")
    check_image(dog)
    img = load_image(dog)
    assert img.shape == (534, 800, 3) and img.dtype == np.uint8
    assert img.std() > 10  # real content, not a blank decode
    for name in ("truck.jpg", "groceries.jpg"):
        check_image(_media(name))


# --------------------------------------------------------------------------- #
# RLE and boxes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (120, 97)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_rle_round_trip(shape: tuple[int, int], density: float) -> None:
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density

    rle = mask_to_rle(mask)

    assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
    json.dumps(rle)  # must be serialisable as is
    coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)
    assert int(mask_utils.area(coco)) == int(mask.sum())
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    np.testing.assert_array_equal(rle_to_mask(coco), mask)  # bytes counts


def test_rle_handles_non_contiguous_views() -> None:
    mask = np.zeros((6, 9), bool)
    mask[1:4, 2:8] = True
    view = mask.T  # Fortran-ordered view of a transposed mask
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(view)), view)


def test_uncompressed_and_malformed_rle() -> None:
    # Column-major runs over a 2x3 mask: 1 off, 2 on, 3 off.
    np.testing.assert_array_equal(
        rle_to_mask({"size": [2, 3], "counts": [1, 2, 3]}), [[False, True, False], [True, False, False]]
    )
    for bad in ({"counts": "abc"}, {"size": [2, 3], "counts": ""}, {"size": [2, 3], "counts": "zz!!"},
                {"size": [2, 3], "counts": [1, 1]}, {"size": [2, 3], "counts": [1, "a", 4]},
                {"size": "2x3", "counts": "3"}):
        with pytest.raises(InputError):
            rle_to_mask(bad)


def test_bbox_hand_computed() -> None:
    single = np.zeros((10, 8), bool)
    single[5, 3] = True  # row y=5, column x=3
    assert mask_to_bbox(single) == [3, 5, 1, 1]

    assert mask_to_bbox(np.zeros((10, 8), bool)) == [0, 0, 0, 0]

    ell = np.zeros((10, 8), bool)
    ell[2:9, 1] = True  # vertical stroke, rows 2..8
    ell[8, 1:7] = True  # foot, columns 1..6
    assert mask_to_bbox(ell) == [1, 2, 6, 7]

    boxes = masks_to_boxes_xyxy(np.stack([single, np.zeros_like(single), ell]))
    assert boxes.shape == (3, 4) and boxes.dtype.kind == "f"
    np.testing.assert_array_equal(boxes, [[3, 5, 4, 6], [0, 0, 0, 0], [1, 2, 7, 9]])


def test_bbox_agrees_with_pycocotools() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((5, 30, 40), bool)
    for m in masks[:4]:
        y, x = rng.integers(0, 25), rng.integers(0, 35)
        m[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
    masks[3, 0, 39] = True  # reaches the image corner
    boxes = masks_to_boxes_xyxy(masks)
    for m, box in zip(masks, boxes):
        expected = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m, dtype=np.uint8)))
        np.testing.assert_array_equal(mask_to_bbox(m), expected)
        x, y, w, h = mask_to_bbox(m)
        np.testing.assert_array_equal(box, [x, y, x + w, y + h])
    assert masks_to_boxes_xyxy(np.zeros((0, 30, 40), bool)).shape == (0, 4)


# --------------------------------------------------------------------------- #
# Atomic writes
# --------------------------------------------------------------------------- #


def test_atomic_write_success_replaces_target(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".json"
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target, existing = tmp_path / "mask.png", tmp_path / "keep.png"
    existing.write_bytes(b"previous")
    for path in (target, existing):
        with pytest.raises(RuntimeError, match="boom"):
            with atomic_write(path) as tmp:
                tmp.write_bytes(b"partial")
                raise RuntimeError("boom")
    assert not target.exists()
    assert existing.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_save_helpers_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((9, 14), bool)
    mask[2:5, 3:11] = True
    save_png_mask(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "L" and img.size == (14, 9)
        np.testing.assert_array_equal(np.asarray(img), np.where(mask, 255, 0))

    save_json(tmp_path / "r.json", {"score": np.float32(0.5), "box": np.arange(4), "name": "café"})
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"score": 0.5, "box": [0, 1, 2, 3], "name": "café"}
    assert text.endswith("\n")

    rgb = _blocks()
    save_jpeg(tmp_path / "o.jpg", rgb)
    back = load_image(tmp_path / "o.jpg")
    assert back.shape == rgb.shape
    assert np.abs(back.astype(int) - rgb).mean() < 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "o.jpg", "r.json"]


# --------------------------------------------------------------------------- #
# Overlay
# --------------------------------------------------------------------------- #


def test_overlay_masks_and_banner() -> None:
    image = np.full((200, 300, 3), 180, np.uint8)
    original = image.copy()
    masks = np.zeros((2, 200, 300), bool)
    masks[0, 120:180, 20:100] = True
    masks[1, 100:190, 150:280] = True

    out = overlay(image, masks, "the dog on the left", phrases=["dog", None])

    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, original)  # input untouched
    inner0, inner1 = out[150, 60], out[170, 200]  # well inside each mask, away from labels
    assert (inner0 != 180).any() and (inner1 != 180).any()
    assert (inner0 != inner1).any(), "masks must get distinct colours"
    np.testing.assert_array_equal(out[110, 5], original[110, 5])  # far from masks and text
    banner = out[:10].astype(float)
    assert banner.mean() < original[:10].mean() - 50, "text banner must darken the top band"
    assert (out[:40] == 255).all(axis=2).any(), "banner must contain white text"


def test_overlay_without_text_keeps_top_and_draws_boxes() -> None:
    image = np.full((100, 100, 3), 120, np.uint8)
    out = overlay(image, None, None, phrases=["cup"], boxes=np.array([[10.0, 20.0, 60.0, 80.0]]))
    np.testing.assert_array_equal(out[:15], image[:15])
    np.testing.assert_array_equal(out[50, 40], image[50, 40])  # box interior not filled
    assert (out[50, 10] != 120).any() and (out[79, 40] != 120).any()  # left/bottom edges (x2, y2 exclusive)
    np.testing.assert_array_equal(out[50, 62], image[50, 62])


@pytest.mark.parametrize("width", [64, 1800])
def test_overlay_long_text_is_wrapped_and_bounded(width: int) -> None:
    from groundseg.io import _font_scale, _text_width, _wrap_banner

    height = width * 2 // 3
    text = "The answer is a long sentence about the scene " * 30
    scale = _font_scale(width)
    lines = _wrap_banner(text, width, height, scale)
    assert 1 <= len(lines) <= 4 and lines[-1].endswith("...")
    assert all(_text_width(line, scale) <= width for line in lines)

    out = overlay(np.full((height, width, 3), 200, np.uint8), None, text)
    assert out[:3].mean() < 120  # dark band present even at 64 px
    assert out[height - 3 :].mean() == 200  # and it stays at the top


def test_overlay_rejects_mismatched_masks() -> None:
    with pytest.raises(ValueError, match="masks must have shape"):
        overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((1, 10, 11), bool))
    with pytest.raises(ValueError, match="phrases"):
        overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((1, 10, 10), bool), phrases=["a", "b"])
