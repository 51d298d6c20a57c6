"""Grounding special tokens, token-id lookup and grounding-markup parsing.

This module is the single place that knows the textual grounding conventions
used by the supported model families:

* LISA: one ``[SEG]`` token per predicted mask; the mask query is read from the
  hidden state of the token that *emits* ``[SEG]``.
* GLaMM / Sa2VA grounded conversation generation (GCG): a caption in which each
  grounded phrase is written ``<p> phrase </p> [SEG]``.
* Qwen-VL style referring boxes: ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``
  with coordinates on a 0-1000 grid.

Everything here is pure: no function mutates its input except
:func:`add_grounding_tokens`, which by design adds tokens to the tokenizer it is
given.  Tokenizers are only duck-typed (``convert_tokens_to_ids``,
``add_tokens``, ``unk_token``/``unk_token_id``), so this module does not import
``transformers``.

Token ids
---------
Always resolve ids with :func:`token_id` (``convert_tokens_to_ids``). Never use
``tokenizer(token).input_ids[0]``: with ``legacy=False`` LLaMA tokenizers on
current ``transformers`` that returns the id of the SentencePiece prefix ``"▁"``
(29871) instead of the added token (LISA issue #55, GLaMM issues #32/#73). The
ids are also not stable across checkpoints (``[SEG]`` is 32003 in LISA-7B-v1 but
32000 in LISA-13B-llama2-v1), so they must never be hard-coded.

Box coordinate conventions
--------------------------
Coordinates inside ``<box>`` are integers on a ``[0, 1000]`` grid relative to the
image width (x) and height (y), corners ``(x1,y1),(x2,y2)`` (continuous xyxy,
no ``+1`` pixel-inclusive convention).

* Encoding (:func:`format_box`): ``round(x * scale / W)`` (half-up), clamped to
  ``[0, scale]``.
* Decoding with ``convention="1000"``: ``x * W / 1000`` (the exact inverse of
  the encoding; used by Qwen2-VL/Qwen3-VL cookbooks).
* Decoding with ``convention="999"``: ``x / 999 * W``. This reproduces Qwen-VL's
  own ``eval_mm/evaluate_grounding.py``, which divides by 999 (the README
  describes the range as ``[0, 1000)``). That script does **not** clamp and maps
  an unparsable answer to the box ``(0, 0, 0, 0)``; here decoded boxes are
  always clamped to the image and unparsable boxes are skipped instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = [
    "SEG",
    "P_START",
    "P_END",
    "REF_START",
    "REF_END",
    "BOX_START",
    "BOX_END",
    "BBOX",
    "IMAGE",
    "IM_START",
    "IM_END",
    "IM_PATCH",
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "GROUNDING_TOKENS",
    "MissingTokenError",
    "token_id",
    "special_token_ids",
    "add_grounding_tokens",
    "GroundedBox",
    "GroundedPhrase",
    "format_box",
    "format_ref_box",
    "parse_boxes",
    "parse_phrases",
    "count_seg",
    "strip_grounding",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SEG = "[SEG]"
"""Mask token (LISA, GLaMM, Sa2VA). LISA adds it as a *non-special* token."""
P_START = "<p>"
"""Opens a grounded phrase in GCG captions (GLaMM, Sa2VA)."""
P_END = "</p>"
"""Closes a grounded phrase in GCG captions."""
REF_START = "<ref>"
"""Opens a referring expression (Qwen-VL)."""
REF_END = "</ref>"
"""Closes a referring expression (Qwen-VL)."""
BOX_START = "<box>"
"""Opens a box ``(x1,y1),(x2,y2)`` on the 0-1000 grid (Qwen-VL)."""
BOX_END = "</box>"
"""Closes a box."""
BBOX = "<bbox>"
"""Region placeholder whose embedding is replaced by a region feature (GLaMM)."""
IMAGE = "<image>"
"""Image placeholder in prompts; replaced by :data:`IMAGE_TOKEN_INDEX` ids, usually never added to the vocabulary."""
IM_START = "<im_start>"
"""Marks the start of the image features (LLaVA v0 style)."""
IM_END = "<im_end>"
"""Marks the end of the image features."""
IM_PATCH = "<im_patch>"
"""Per-patch image placeholder (LLaVA v0 style)."""

IMAGE_TOKEN_INDEX: int = -200
"""Sentinel id spliced into ``input_ids`` where image features go (LLaVA convention)."""
IGNORE_INDEX: int = -100
"""Label id ignored by the cross-entropy loss."""

GROUNDING_TOKENS: tuple[str, ...] = (
    SEG,
    P_START,
    P_END,
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
    BBOX,
    IMAGE,
    IM_START,
    IM_END,
    IM_PATCH,
)
"""Every string token defined above, in a stable order."""

ImageSize = tuple[int, int]
"""``(height, width)`` in pixels."""
BoxXYXY = tuple[float, float, float, float]
Convention = Literal["1000", "999"]

# ---------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------


class MissingTokenError(KeyError, ValueError):
    """A token is not in the tokenizer's vocabulary.

    Subclasses both :class:`KeyError` and :class:`ValueError` so either can be
    caught.
    """

    def __init__(self, token: str, detail: str = "") -> None:
        self.token = token
        msg = f"token {token!r} is not in the tokenizer vocabulary"
        if detail:
            msg = f"{msg} ({detail})"
        msg += "; add it with add_grounding_tokens() and resize the model embeddings"
        super().__init__(msg)
        self.message = msg

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def _unk(tokenizer: Any) -> tuple[str | None, int | None]:
    unk_token = getattr(tokenizer, "unk_token", None)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    return (str(unk_token) if unk_token is not None else None), unk_id


def _lookup(tokenizer: Any, token: str) -> int | None:
    """Return the id of ``token`` or ``None`` if it is absent / maps to unk."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or isinstance(tid, bool) or not isinstance(tid, int):
        return None
    unk_token, unk_id = _unk(tokenizer)
    if unk_id is not None and tid == unk_id and token != unk_token:
        return None
    return tid


def token_id(tokenizer: Any, token: str) -> int:
    """Return the vocabulary id of a single token.

    Uses ``tokenizer.convert_tokens_to_ids(token)``, which looks the token up
    directly instead of tokenizing it as text (``tokenizer(token).input_ids[0]``
    can return the ``"▁"`` prefix id 29871 on ``legacy=False`` LLaMA tokenizers).

    Args:
        tokenizer: A Hugging Face (slow or fast) tokenizer.
        token: The token string, e.g. :data:`SEG`.

    Returns:
        The integer id.

    Raises:
        MissingTokenError: (a ``KeyError`` and ``ValueError``) if the tokenizer
            returns ``None`` or its unknown-token id for ``token``.
    """
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or isinstance(tid, bool) or not isinstance(tid, int):
        raise MissingTokenError(token, f"convert_tokens_to_ids returned {tid!r}")
    unk_token, unk_id = _unk(tokenizer)
    if unk_id is not None and tid == unk_id and token != unk_token:
        raise MissingTokenError(token, f"it maps to the unknown token {unk_token!r} (id {unk_id})")
    return tid


def special_token_ids(tokenizer: Any, tokens: Iterable[str] = GROUNDING_TOKENS) -> dict[str, int]:
    """Map each token in ``tokens`` that the tokenizer knows to its id.

    Tokens that are absent (``None`` or the unknown id) are left out rather
    than raising; use :func:`token_id` when a token is required.

    Args:
        tokenizer: A Hugging Face tokenizer.
        tokens: Tokens to look up; defaults to :data:`GROUNDING_TOKENS`.

    Returns:
        ``{token: id}`` for the present tokens, in the order of ``tokens``.
    """
    out: dict[str, int] = {}
    for tok in tokens:
        tid = _lookup(tokenizer, tok)
        if tid is not None:
            out[tok] = tid
    return out


def add_grounding_tokens(
    tokenizer: Any,
    tokens: Iterable[str],
    *,
    special: Union[bool, Collection[str]] = False,
) -> int:
    """Add the tokens of ``tokens`` that the tokenizer does not know yet.

    Tokens already present (including ones in the base vocabulary) are left
    untouched. Duplicates in ``tokens`` are added once. The caller must resize
    the model's embeddings afterwards, e.g.
    ``model.resize_token_embeddings(len(tokenizer))``.

    The ``special`` flag matters: LISA adds ``[SEG]`` as a *normal* added token
    (``add_tokens("[SEG]")``) but ``<im_start>``/``<im_end>`` with
    ``special_tokens=True``; GLaMM adds all of its tokens as special. Special
    tokens are dropped by ``decode(..., skip_special_tokens=True)`` and are not
    normalized; normal added tokens survive decoding.

    Args:
        tokenizer: A Hugging Face tokenizer (mutated in place).
        tokens: Tokens to ensure, e.g. ``[SEG, IM_START, IM_END]``.
        special: ``True``/``False`` to add all missing tokens as special /
            normal tokens, or a collection naming the tokens to add as special
            (the others are added as normal), e.g. ``special={IM_START, IM_END}``
            reproduces LISA.

    Returns:
        The number of tokens actually added.
    """
    wanted: list[str] = []
    for tok in tokens:
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"tokens must be non-empty strings, got {tok!r}")
        if tok not in wanted:
            wanted.append(tok)
    missing = [tok for tok in wanted if _lookup(tokenizer, tok) is None]
    if isinstance(special, bool):
        groups = {special: missing}
    else:
        special_set = set(special)
        groups = {
            False: [t for t in missing if t not in special_set],
            True: [t for t in missing if t in special_set],
        }
    added = 0
    for is_special, group in groups.items():
        if group:
            added += int(tokenizer.add_tokens(group, special_tokens=is_special))
    return added


# ---------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundedBox:
    """One box parsed from ``<box>(x1,y1),(x2,y2)</box>`` markup.

    Attributes:
        phrase: The ``<ref>`` phrase (whitespace-stripped) the box belongs to,
            or ``None`` for a box that does not directly follow a ref (or a
            ref's earlier boxes).
        box: ``(x1, y1, x2, y2)`` in pixels, clamped to the image and with
            ``x1 <= x2`` and ``y1 <= y2``.
        span: ``(start, end)`` character offsets of the whole
            ``<box>...</box>`` element in the parsed text.
    """

    phrase: str | None
    box: BoxXYXY
    span: tuple[int, int]


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    h, w = image_size
    if not (h > 0 and w > 0):
        raise ValueError(f"image_size must be positive (height, width), got {image_size!r}")
    return h, w


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _encode(v: float, extent: float, scale: int) -> int:
    return min(max(_round_half_up(v * scale / extent), 0), scale)


def format_box(
    box_xyxy_pixels: Sequence[float],
    image_size: ImageSize,
    scale: int = 1000,
) -> str:
    """Format a pixel box as ``<box>(x1,y1),(x2,y2)</box>`` on a ``scale`` grid.

    Each coordinate becomes ``round(x * scale / W)`` (``y`` uses ``H``), rounded
    half-up and clamped to ``[0, scale]``. Corners are reordered so that the
    first one is the top-left.

    Args:
        box_xyxy_pixels: ``(x1, y1, x2, y2)`` in pixels.
        image_size: ``(height, width)`` of the image in pixels.
        scale: Grid size; 1000 for Qwen-VL.

    Returns:
        E.g. ``"<box>(250,100),(750,900)</box>"``.

    Raises:
        ValueError: For a box without 4 finite numbers or a bad image size.
    """
    h, w = _check_size(image_size)
    if len(box_xyxy_pixels) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {box_xyxy_pixels!r}")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_pixels)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box coordinates must be finite, got {box_xyxy_pixels!r}")
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    a = _encode(x1, w, scale)
    b = _encode(y1, h, scale)
    c = _encode(x2, w, scale)
    d = _encode(y2, h, scale)
    return f"{BOX_START}({a},{b}),({c},{d}){BOX_END}"


def _is_single_box(box: Any) -> bool:
    """True for ``(x1, y1, x2, y2)`` numbers, False for a sequence of boxes."""
    if isinstance(box, (str, bytes)) or len(box) != 4:
        return False
    try:
        [float(v) for v in box]
    except (TypeError, ValueError):
        return False
    return True


def format_ref_box(
    phrase: str,
    box: Union[Sequence[float], Sequence[Sequence[float]]],
    image_size: ImageSize,
    scale: int = 1000,
) -> str:
    """Format ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``.

    Args:
        phrase: The referring expression (inserted verbatim).
        box: One pixel box ``(x1, y1, x2, y2)`` or a sequence of such boxes,
            which are written one after another after the single ref.
        image_size: ``(height, width)`` in pixels.
        scale: Grid size; 1000 for Qwen-VL.

    Returns:
        The formatted string, e.g. ``"<ref>dog</ref><box>(0,0),(500,500)</box>"``.
    """
    boxes = [box] if _is_single_box(box) else list(box)  # type: ignore[list-item]
    if not boxes:
        raise ValueError("format_ref_box needs at least one box")
    return f"{REF_START}{phrase}{REF_END}" + "".join(format_box(b, image_size, scale) for b in boxes)


_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_BOX_BODY_RE = re.compile(rf"^\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*$")
# ref bodies may not contain another <ref> or a <box>; box bodies may not contain any tag.
_REF_OR_BOX_RE = re.compile(
    r"<ref>(?P<ref>(?:(?!</?ref>|<box>).)*?)</ref>|<box>(?P<box>[^<]*)</box>",
    re.DOTALL,
)


def _decode(v: float, extent: int, convention: Convention) -> float:
    if convention == "1000":
        p = v * extent / 1000.0
    else:
        p = v / 999.0 * extent
    return min(max(p, 0.0), float(extent))


def parse_boxes(
    text: str,
    image_size: ImageSize,
    convention: Convention = "1000",
) -> list[GroundedBox]:
    """Parse every ``<box>(x1,y1),(x2,y2)</box>`` in ``text`` into pixel boxes.

    A box takes the phrase of the ``<ref>...</ref>`` directly before it; several
    boxes may follow one ref (only whitespace may separate them), e.g.
    ``<ref>dogs</ref><box>...</box><box>...</box>``. A box with no such ref gets
    ``phrase=None``. Whitespace inside the parentheses and decimal values are
    accepted. Coordinates are decoded with ``convention`` (see the module
    docstring), clamped to ``[0, W]``/``[0, H]``, and reversed corners are
    swapped. Malformed boxes (wrong arity, non-numbers, unterminated) are
    skipped without raising; a malformed box between a ref and later boxes
    does not detach those later boxes from the ref.

    Args:
        text: Model output or annotation text.
        image_size: ``(height, width)`` of the image in pixels.
        convention: ``"1000"`` (``x * W / 1000``) or ``"999"`` (``x / 999 * W``,
            Qwen-VL's evaluation script).

    Returns:
        The boxes in order of appearance.
    """
    h, w = _check_size(image_size)
    if convention not in ("1000", "999"):
        raise ValueError(f"convention must be '1000' or '999', got {convention!r}")
    out: list[GroundedBox] = []
    current: str | None = None  # phrase boxes may attach to
    last_end = 0
    for m in _REF_OR_BOX_RE.finditer(text):
        gap_is_blank = text[last_end : m.start()].strip() == ""
        last_end = m.end()
        if m.group("ref") is not None:
            current = m.group("ref").strip() or None
            continue
        if not gap_is_blank:
            current = None
        body = _BOX_BODY_RE.match(m.group("box"))
        if body is None:
            continue
        try:
            x1, y1, x2, y2 = (float(g) for g in body.groups())
        except ValueError:  # pragma: no cover - the regex only admits numbers
            continue
        px1, px2 = _decode(x1, w, convention), _decode(x2, w, convention)
        py1, py2 = _decode(y1, h, convention), _decode(y2, h, convention)
        box = (min(px1, px2), min(py1, py2), max(px1, px2), max(py1, py2))
        out.append(GroundedBox(phrase=current, box=box, span=(m.start(), m.end())))
    return out


# ---------------------------------------------------------------------------
# GCG phrases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundedPhrase:
    """One ``<p>phrase</p>`` of a GCG caption.

    Attributes:
        phrase: The phrase text with surrounding whitespace stripped.
        span: ``(start, end)`` offsets such that ``text[start:end] == phrase``.
        seg_index: 0-based index of the ``[SEG]`` occurrence (counted over the
            whole text) that follows this phrase before the next ``<p>``, or
            ``None`` if there is none.
    """

    phrase: str
    span: tuple[int, int]
    seg_index: int | None


_PHRASE_RE = re.compile(r"<p>((?:(?!</?p>).)*?)</p>", re.DOTALL)


def parse_phrases(text: str) -> list[GroundedPhrase]:
    """Parse GCG ``<p> phrase </p> [SEG]`` markup.

    Unterminated ``<p>`` and stray ``</p>`` are ignored. Note that GLaMM itself
    pairs the k-th phrase with the k-th ``[SEG]`` purely by order; that agrees
    with ``seg_index`` whenever every phrase is followed by exactly one
    ``[SEG]``. When it is not, ``seg_index`` tells you which mask (if any)
    actually belongs to the phrase.

    Args:
        text: A caption such as ``"A <p>man</p> [SEG] holds a <p>red cup</p> [SEG]."``.

    Returns:
        The phrases in order of appearance.
    """
    seg_starts = [m.start() for m in re.finditer(re.escape(SEG), text)]
    matches = list(_PHRASE_RE.finditer(text))
    out: list[GroundedPhrase] = []
    for i, m in enumerate(matches):
        raw = m.group(1)
        lead = len(raw) - len(raw.lstrip())
        phrase = raw.strip()
        start = m.start(1) + lead
        end = start + len(phrase)
        # next <p> (even an unterminated one) bounds the search for a [SEG]
        nxt = text.find(P_START, m.end())
        limit = nxt if nxt != -1 else len(text)
        if i + 1 < len(matches):
            limit = min(limit, matches[i + 1].start())
        seg_index: int | None = None
        for k, s in enumerate(seg_starts):
            if s >= m.end():
                if s < limit:
                    seg_index = k
                break
        out.append(GroundedPhrase(phrase=phrase, span=(start, end), seg_index=seg_index))
    return out


def count_seg(text: str) -> int:
    """Return the number of ``[SEG]`` tokens in ``text``."""
    return text.count(SEG)


# Markup removed together with its content.
_DROP_WITH_CONTENT_RE = re.compile(r"<box>[^<]*</box>")
# Tags that wrap words: removed without inserting a space, so "a<p>b</p>" -> "ab".
_WRAPPER_TAGS_RE = re.compile("|".join(re.escape(t) for t in (P_START, P_END, REF_START, REF_END)))
# Standalone tokens: replaced by a space so that neighbouring words do not merge.
_STANDALONE_RE = re.compile(
    "|".join(re.escape(t) for t in (SEG, BOX_START, BOX_END, BBOX, IMAGE, IM_START, IM_END, IM_PATCH))
)
_SPACE_RUN_RE = re.compile(r"[ \t\f\v]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"[ \t]+([.,;:!?)\]}])")
_SPACE_AFTER_OPEN_RE = re.compile(r"([(\[{])[ \t]+")
# "Sure, [SEG]." leaves "Sure,." -> drop the dangling ",;:" before ".!?".
_DANGLING_PUNCT_RE = re.compile(r"[,;:]+([.!?])")


def strip_grounding(text: str) -> str:
    """Turn grounded model output into a clean human-readable caption.

    Removes ``<p>``/``</p>`` and ``<ref>``/``</ref>`` (keeping the phrase
    words), ``[SEG]``, whole ``<box>...</box>`` elements (coordinates included),
    and the other :data:`GROUNDING_TOKENS`; then collapses runs of spaces,
    removes spaces before ``.,;:!?)]}`` and after ``([{``, drops a ``,;:``
    left dangling before ``.!?`` (``"Sure, [SEG]."`` -> ``"Sure."``), and strips
    each line.
    Other ``<...>`` text is left alone. Newlines are kept.

    Example:
        ``"A <p> man </p> [SEG] rides a <p> horse </p> [SEG]."`` →
        ``"A man rides a horse."``
    """
    out = _DROP_WITH_CONTENT_RE.sub(" ", text)
    out = _WRAPPER_TAGS_RE.sub("", out)
    out = _STANDALONE_RE.sub(" ", out)
    out = _SPACE_RUN_RE.sub(" ", out)
    out = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", out)
    out = _SPACE_AFTER_OPEN_RE.sub(r"\1", out)
    out = _DANGLING_PUNCT_RE.sub(r"\1", out)
    lines = [ln.strip(" ") for ln in out.split("\n")]
    return "\n".join(lines).strip()
