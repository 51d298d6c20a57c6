"""Tests for groundseg.grounding.tokens (no network: tokenizers are built in memory)."""

from __future__ import annotations

import dataclasses

import pytest

from groundseg.grounding import tokens as T
from groundseg.grounding.tokens import (
    GROUNDING_TOKENS,
    SEG,
    GroundedBox,
    GroundedPhrase,
    MissingTokenError,
    add_grounding_tokens,
    count_seg,
    format_box,
    format_ref_box,
    parse_boxes,
    parse_phrases,
    special_token_ids,
    strip_grounding,
    token_id,
)

# ---------------------------------------------------------------------------
# tiny in-memory tokenizers
# ---------------------------------------------------------------------------

BASE_WORDS = ["<unk>", "a", "man", "holds", "red", "cup", "."]


def _wordlevel(words: list[str], unk: str | None = "<unk>"):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(words)}
    if unk is None:
        model = tokenizers.models.WordLevel(vocab)
    else:
        model = tokenizers.models.WordLevel(vocab, unk_token=unk)
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    kwargs = {} if unk is None else {"unk_token": unk}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------


def test_constants():
    assert (T.SEG, T.P_START, T.P_END) == ("[SEG]", "<p>", "</p>")
    assert (T.REF_START, T.REF_END, T.BOX_START, T.BOX_END) == ("<ref>", "</ref>", "<box>", "</box>")
    assert (T.BBOX, T.IMAGE, T.IM_START, T.IM_END, T.IM_PATCH) == (
        "<bbox>",
        "<image>",
        "<im_start>",
        "<im_end>",
        "<im_patch>",
    )
    assert T.IMAGE_TOKEN_INDEX == -200
    assert T.IGNORE_INDEX == -100
    assert len(GROUNDING_TOKENS) == 12
    assert len(set(GROUNDING_TOKENS)) == 12
    assert all(isinstance(t, str) for t in GROUNDING_TOKENS)
    assert set(GROUNDING_TOKENS) >= {"[SEG]", "<p>", "</p>", "<ref>", "</ref>", "<box>", "</box>", "<bbox>"}


# ---------------------------------------------------------------------------
# token ids
# ---------------------------------------------------------------------------


def test_token_id_looked_up_not_hard_coded():
    # tokenizer A: 7 base words -> [SEG] gets id 7
    tok_a = _wordlevel(BASE_WORDS)
    assert add_grounding_tokens(tok_a, [SEG]) == 1
    # tokenizer B: 10 base words and <p> added first -> [SEG] gets id 11
    tok_b = _wordlevel(BASE_WORDS + ["x", "y", "z"])
    assert add_grounding_tokens(tok_b, ["<p>", SEG]) == 2

    assert token_id(tok_a, SEG) == 7
    assert token_id(tok_b, SEG) == 11
    assert token_id(tok_b, "<p>") == 10
    # and it is the id the tokenizer really emits for [SEG] in running text
    assert tok_a("a man [SEG] .", add_special_tokens=False).input_ids == [1, 2, 7, 6]
    assert tok_b("a man [SEG] .", add_special_tokens=False).input_ids == [1, 2, 11, 6]
    # ordinary vocabulary tokens resolve too
    assert token_id(tok_a, "cup") == 5


def test_token_id_missing_raises():
    tok = _wordlevel(BASE_WORDS)
    with pytest.raises(KeyError, match=r"\[SEG\]"):
        token_id(tok, SEG)
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        token_id(tok, SEG)
    with pytest.raises(MissingTokenError) as ei:
        token_id(tok, "<p>")
    assert ei.value.token == "<p>"
    assert "<p>" in str(ei.value) and "unknown" in str(ei.value)
    # the unk token itself is a legitimate lookup
    assert token_id(tok, "<unk>") == 0


class _LegacyFalseLlamaStub:
    """Mimics a legacy=False LLaMA tokenizer on new transformers (LISA issue #55):
    encoding "[SEG]" as text yields the "\u2581" prefix id 29871 first."""

    unk_token = "<unk>"
    unk_token_id = 0

    def __call__(self, text, **kwargs):  # pragma: no cover - must not be used
        raise AssertionError("token_id must not tokenize the token as text")

    def convert_tokens_to_ids(self, token):
        return {"[SEG]": 32003, "<im_start>": 32001}.get(token, 0)


def test_token_id_never_tokenizes_text():
    stub = _LegacyFalseLlamaStub()
    assert token_id(stub, SEG) == 32003
    assert special_token_ids(stub) == {"[SEG]": 32003, "<im_start>": 32001}
    with pytest.raises(KeyError, match="<p>"):
        token_id(stub, "<p>")


def test_token_id_missing_without_unk_token():
    # a vocabulary without an unk token: convert_tokens_to_ids returns None
    tok = _wordlevel(["a", "b"], unk=None)
    with pytest.raises(KeyError, match=r"\[SEG\]"):
        token_id(tok, SEG)
    add_grounding_tokens(tok, [SEG])
    assert token_id(tok, SEG) == 2


def test_special_token_ids_only_present():
    tok = _wordlevel(BASE_WORDS)
    assert special_token_ids(tok) == {}
    add_grounding_tokens(tok, [SEG, "<p>", "</p>"])
    assert special_token_ids(tok) == {"[SEG]": 7, "<p>": 8, "</p>": 9}
    assert special_token_ids(tok, tokens=["</p>", "<box>", "man"]) == {"</p>": 9, "man": 2}


def test_add_grounding_tokens_counts_and_special_flag():
    tok = _wordlevel(BASE_WORDS)
    # LISA: [SEG] is a normal added token, <im_start>/<im_end> are special
    n = add_grounding_tokens(tok, [SEG, "<im_start>", "<im_end>", SEG], special={"<im_start>", "<im_end>"})
    assert n == 3
    assert len(tok) == 10
    assert add_grounding_tokens(tok, [SEG, "<im_start>", "<im_end>"]) == 0
    assert add_grounding_tokens(tok, ["man", SEG, "<p>"], special=True) == 1  # "man" is in the base vocab
    assert len(tok) == 11

    ids = tok("<im_start> a man [SEG] <im_end>", add_special_tokens=False).input_ids
    seg, ims, ime = token_id(tok, SEG), token_id(tok, "<im_start>"), token_id(tok, "<im_end>")
    assert ids == [ims, 1, 2, seg, ime]
    # special tokens vanish with skip_special_tokens=True, the normal [SEG] survives
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "[SEG]" in decoded
    assert "<im_start>" not in decoded and "<im_end>" not in decoded


def test_add_grounding_tokens_rejects_bad_tokens():
    tok = _wordlevel(BASE_WORDS)
    with pytest.raises(ValueError):
        add_grounding_tokens(tok, [""])


# ---------------------------------------------------------------------------
# box formatting
# ---------------------------------------------------------------------------


def test_format_box_hand_computed():
    # h=400, w=800: x*1000/800, y*1000/400
    assert format_box((100, 50, 300, 200), (400, 800)) == "<box>(125,125),(375,500)</box>"
    # reversed corners are reordered
    assert format_box((300, 200, 100, 50), (400, 800)) == "<box>(125,125),(375,500)</box>"
    # clamped to [0, scale]
    assert format_box((-10, -5, 900, 500), (400, 800)) == "<box>(0,0),(1000,1000)</box>"
    # rounding is half-up (0.5 -> 1, 1.5 -> 2), not banker's (0.5 -> 0)
    assert format_box((1, 1, 3, 3), (2000, 2000)) == "<box>(1,1),(2,2)</box>"
    # other scale
    assert format_box((100, 50, 300, 200), (400, 800), scale=100) == "<box>(13,13),(38,50)</box>"


def test_format_box_invalid():
    with pytest.raises(ValueError):
        format_box((1, 2, 3), (10, 10))
    with pytest.raises(ValueError):
        format_box((1, 2, 3, float("nan")), (10, 10))
    with pytest.raises(ValueError):
        format_box((1, 2, 3, 4), (0, 10))


def test_format_ref_box():
    assert (
        format_ref_box("the dog", (100, 50, 300, 200), (400, 800))
        == "<ref>the dog</ref><box>(125,125),(375,500)</box>"
    )
    assert (
        format_ref_box("dogs", [(0, 0, 400, 200), (400, 200, 800, 400)], (400, 800))
        == "<ref>dogs</ref><box>(0,0),(500,500)</box><box>(500,500),(1000,1000)</box>"
    )


@pytest.mark.parametrize(
    "image_size",
    [(480, 640), (1080, 1920), (333, 517), (2000, 1500), (7, 13), (1000, 1000)],
)
def test_round_trip_within_one_pixel(image_size):
    h, w = image_size
    boxes = [
        (0.0, 0.0, w, h),
        (0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h),
        (w / 3, h / 7, w / 2 + 0.4, h - 1.3),
        (1.0, 2.0, 3.0, 4.0),
    ]
    for box in boxes:
        box = (min(box[0], w), min(box[1], h), min(box[2], w), min(box[3], h))
        text = format_ref_box("obj", box, image_size)
        (parsed,) = parse_boxes(text, image_size, convention="1000")
        assert parsed.phrase == "obj"
        for got, want in zip(parsed.box, box):
            # quantisation error is <= 0.5 * side / 1000, i.e. <= 1 px up to 2000 px
            assert abs(got - want) <= 1.0


def test_round_trip_several_boxes_one_text():
    size = (480, 640)
    boxes = [(10, 20, 110, 220), (300, 100, 640, 480), (0, 0, 5, 5)]
    text = "Here: " + " and ".join(format_ref_box(f"o{i}", b, size) for i, b in enumerate(boxes)) + "."
    parsed = parse_boxes(text, size)
    assert [p.phrase for p in parsed] == ["o0", "o1", "o2"]
    for p, b in zip(parsed, boxes):
        assert p.box == pytest.approx(b, abs=1.0)


# ---------------------------------------------------------------------------
# box parsing
# ---------------------------------------------------------------------------


def test_999_vs_1000_convention():
    text = "<box>(500,500),(999,999)</box>"
    size = (1000, 2000)  # (h, w)
    (b1000,) = parse_boxes(text, size, convention="1000")
    (b999,) = parse_boxes(text, size, convention="999")
    # 1000: x*W/1000 -> 500*2=1000, 500*1=500, 999*2=1998, 999*1=999
    assert b1000.box == pytest.approx((1000.0, 500.0, 1998.0, 999.0))
    # 999: x/999*W -> 500/999*2000=1001.001..., 500/999*1000=500.5005..., 2000, 1000
    assert b999.box == pytest.approx((1001.001001, 500.5005005, 2000.0, 1000.0))
    assert b999.box != b1000.box
    assert b1000.phrase is None
    with pytest.raises(ValueError):
        parse_boxes(text, size, convention="100")  # type: ignore[arg-type]


def test_default_convention_is_1000():
    assert parse_boxes("<box>(250,250),(750,750)</box>", (200, 400))[0].box == (100.0, 50.0, 300.0, 150.0)


def test_multiple_boxes_per_ref_and_spans():
    text = (
        "<ref>dogs</ref><box>(0,0),(500,500)</box> <box>(500,500),(1000,1000)</box>"
        " and <box>(100,100),(200,200)</box>"
    )
    out = parse_boxes(text, (100, 200))  # h=100, w=200
    assert [b.phrase for b in out] == ["dogs", "dogs", None]
    assert [b.box for b in out] == [
        (0.0, 0.0, 100.0, 50.0),
        (100.0, 50.0, 200.0, 100.0),
        (20.0, 10.0, 40.0, 20.0),
    ]
    assert out[0].span == (15, 41)
    assert text[out[0].span[0] : out[0].span[1]] == "<box>(0,0),(500,500)</box>"
    assert text[slice(*out[1].span)] == "<box>(500,500),(1000,1000)</box>"
    assert text[slice(*out[2].span)] == "<box>(100,100),(200,200)</box>"
    assert isinstance(out[0], GroundedBox)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out[0].phrase = "x"  # type: ignore[misc]


def test_two_refs_and_qwen_spacing():
    text = "<ref> Woman</ref><box>(451,379),(731,806)</box> next to <ref>a cat</ref><box>(0,0),(10,10)</box>"
    out = parse_boxes(text, (1000, 1000))
    assert [b.phrase for b in out] == ["Woman", "a cat"]
    assert out[0].box == (451.0, 379.0, 731.0, 806.0)
    assert out[1].box == (0.0, 0.0, 10.0, 10.0)


def test_whitespace_and_decimals_inside_box():
    out = parse_boxes("<box>( 100 , 200 ) , ( 300 ,400 )</box><box>(1.5,2.5),(3.5,4.5)</box>", (1000, 1000))
    assert [b.box for b in out] == [(100.0, 200.0, 300.0, 400.0), (1.5, 2.5, 3.5, 4.5)]


def test_reversed_corners_swapped():
    out = parse_boxes("<box>(300,400),(100,200)</box><box>(100,400),(300,200)</box>", (1000, 1000))
    assert [b.box for b in out] == [(100.0, 200.0, 300.0, 400.0)] * 2


def test_clamping_to_image():
    # h=500, w=300: x*0.3, y*0.5
    (b,) = parse_boxes("<box>(-50,0),(1200,1100)</box>", (500, 300))
    assert b.box == (0.0, 0.0, 300.0, 500.0)
    (b,) = parse_boxes("<box>(1000,1000),(999,999)</box>", (500, 300), convention="999")
    assert b.box == pytest.approx((300.0, 500.0, 300.0, 500.0))


def test_malformed_boxes_ignored():
    text = (
        "<box>(1,2),(3)</box> <box>(a,b),(c,d)</box> <box></box> <box>1,2,3,4</box>"
        " <box>(1,2),(3,4),(5,6)</box> <box>(1,2)(3,4)</box>"
        " <box>(100,100),(200,200)</box> <box>(5,5),(6,6)"
    )
    out = parse_boxes(text, (1000, 1000))
    assert [b.box for b in out] == [(100.0, 100.0, 200.0, 200.0)]
    assert parse_boxes("", (10, 10)) == []
    assert parse_boxes("no boxes here <ref>x</ref>", (10, 10)) == []
    # an unterminated <box> does not swallow the next box
    out = parse_boxes("<box>(1,2),(3,4) <box>(10,20),(30,40)</box>", (1000, 1000))
    assert [b.box for b in out] == [(10.0, 20.0, 30.0, 40.0)]


def test_malformed_box_keeps_ref_chain():
    out = parse_boxes("<ref>x</ref><box>bad</box><box>(0,0),(10,10)</box>", (1000, 1000))
    assert [(b.phrase, b.box) for b in out] == [("x", (0.0, 0.0, 10.0, 10.0))]


def test_text_between_ref_and_box_detaches():
    out = parse_boxes("<ref>x</ref> is at <box>(0,0),(10,10)</box>", (1000, 1000))
    assert out[0].phrase is None


def test_parse_boxes_bad_image_size():
    with pytest.raises(ValueError):
        parse_boxes("<box>(0,0),(1,1)</box>", (0, 10))


# ---------------------------------------------------------------------------
# GCG phrases
# ---------------------------------------------------------------------------

GCG = "A <p>man</p> [SEG] holds a <p>red cup</p> [SEG]."


def test_parse_phrases_gcg():
    out = parse_phrases(GCG)
    assert out == [
        GroundedPhrase(phrase="man", span=(5, 8), seg_index=0),
        GroundedPhrase(phrase="red cup", span=(30, 37), seg_index=1),
    ]
    for p in out:
        assert GCG[p.span[0] : p.span[1]] == p.phrase
    assert count_seg(GCG) == 2


def test_parse_phrases_glamm_spacing():
    text = "A <p> man </p> [SEG] rides a <p> horse </p> [SEG]."
    out = parse_phrases(text)
    assert [(p.phrase, p.seg_index) for p in out] == [("man", 0), ("horse", 1)]
    for p in out:
        assert text[slice(*p.span)] == p.phrase


def test_parse_phrases_without_seg():
    out = parse_phrases("<p>a dog</p> and <p>a cat</p> [SEG]")
    assert [(p.phrase, p.seg_index) for p in out] == [("a dog", None), ("a cat", 0)]
    out = parse_phrases("[SEG] first, then <p>a</p> <p>b</p> [SEG] [SEG] <p>c</p>")
    assert [(p.phrase, p.seg_index) for p in out] == [("a", None), ("b", 1), ("c", None)]
    assert parse_phrases("no markup [SEG]") == []
    assert parse_phrases("<p>unterminated [SEG]") == []


def test_count_seg():
    assert count_seg("") == 0
    assert count_seg("[SEG][SEG] [SEG].") == 3
    assert count_seg("[seg] SEG") == 0


# ---------------------------------------------------------------------------
# strip_grounding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        (GCG, "A man holds a red cup."),
        ("A <p> man </p> [SEG] rides a <p> horse </p> [SEG].", "A man rides a horse."),
        ("It is [SEG].", "It is."),
        ("Sure, [SEG].", "Sure."),
        ("Sure, the segmentation result is [SEG].", "Sure, the segmentation result is."),
        ("a man[SEG]holds it", "a man holds it"),
        (
            "<ref>dogs</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> are running ( fast ) !",
            "dogs are running (fast)!",
        ),
        ("The <ref> Woman</ref><box>(451,379),(731,806)</box>, smiling.", "The Woman, smiling."),
        ("<image>\nDescribe <bbox> please", "Describe please"),
        ("Plain  text , unchanged  but   tidied .", "Plain text, unchanged but tidied."),
        ("keep a < b and <other> tags", "keep a < b and <other> tags"),
        ("", ""),
    ],
)
def test_strip_grounding(text, expected):
    assert strip_grounding(text) == expected
