"""Conversation templates and prompt tokenisation.

The ``llava_v1`` template (LISA, GLaMM): ``{system} USER: {question} ASSISTANT: {answer}</s>``; an open assistant
turn ends in ``ASSISTANT:``. The image sits at the start of the first question as ``<im_start><image><im_end>\\n``.

Tokenisation, ``tokenization="lisa"``: the official checkpoints were trained with transformers 4.31's *slow*
LLaMA tokenizer, and the ids it gives differ from what transformers 5 gives for the same string:

* 4.31 strips the whitespace on both sides of a non-special added token (``[SEG]``, ``<im_start>``,
  ``<im_end>``), so ``"ASSISTANT: [SEG]"`` ends in ``':'`` then ``[SEG]``; transformers 5 keeps a ``'▁'`` piece
  between them. The state that predicts ``[SEG]`` -- the one LISA feeds to SAM -- would then be that of ``'▁'``
  instead of ``':'``, a different mask prompt.
* 4.31 runs SentencePiece on each text piece between added tokens, so each piece gets the dummy prefix
  (``legacy=True``: ``"[SEG]."`` -> ``[SEG] '▁' '.'``); with ``legacy=False`` only the start of the whole text does.
* Characters outside a SentencePiece vocabulary without byte fallback become ``<unk>`` (id 0) in 4.31 and are
  dropped by transformers 5's converted tokenizer.

:class:`PromptTokenizer` reproduces 4.31: it splits on ``<image>`` and on the added tokens, strips around the
non-special ones, and encodes each text piece with the checkpoint's SentencePiece model when it has one (the
real LLaMA tokenizers and the parity fixture do), else with the tokenizer itself. ``tokenization="plain"``
(our own presets) encodes each piece with the tokenizer as it is, keeping only the ``<image>`` split.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .tokens import IM_END, IM_START, IMAGE, IMAGE_TOKEN_INDEX

SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class Conversation:
    """A single-image conversation template."""

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def prompt(self, turns: list[tuple[str, str | None]]) -> str:
        """``turns`` = [(question, answer or None), ...]; an answer of None leaves the assistant turn open."""
        out = self.system + self.sep
        for i, (question, answer) in enumerate(turns):
            out += f"{self.roles[0]}: {question}{self.sep}{self.roles[1]}:"
            if answer is None:
                if i != len(turns) - 1:
                    raise ValueError("only the last turn may have an open answer")
                return out
            out += f" {answer}{self.sep2}"
        return out


def image_question(question: str, use_im_start_end: bool = True, template: str = "{image}\n") -> str:
    """The first user turn: ``template`` with ``{image}`` = the image placeholder, then the question. LISA's
    template is ``"{image}\n"``; GLaMM's ``"The {image} provides an overview of the picture.\n"``."""
    image = f"{IM_START}{IMAGE}{IM_END}" if use_im_start_end else IMAGE
    return template.format(image=image) + question


class PromptTokenizer:
    """Turns prompt strings into ids with ``<image>`` as :data:`IMAGE_TOKEN_INDEX` (see the module docstring).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        mode: ``"lisa"`` (transformers-4.31 slow LLaMA behaviour) or ``"plain"``.
    """

    def __init__(self, tokenizer, mode: str = "lisa"):
        if mode not in ("lisa", "plain"):
            raise ValueError(f"tokenization mode must be 'lisa' or 'plain', got {mode!r}")
        self.tokenizer = tokenizer
        self.mode = mode
        # transformers 5 keeps `legacy` on the tokenizer object, not always in init_kwargs.
        legacy = getattr(tokenizer, "legacy", None)
        if legacy is None:
            legacy = tokenizer.init_kwargs.get("legacy", True)
        self.legacy = legacy is not False
        self.special = set(tokenizer.all_special_tokens)
        self._sp = None
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if mode == "lisa" and vocab_file and os.path.isfile(vocab_file) and vocab_file.endswith(".model"):
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        added = tokenizer.get_added_vocab()
        if self._sp is not None:
            # transformers 5 lists the SentencePiece model's user-defined pieces (e.g. "\n" in GLaMM's parity
            # tokenizer) as added tokens; 4.31 left them to SentencePiece: split only on control pieces (<s>, </s>),
            # <unk> and ids past the model.
            sp = self._sp
            added = {t: i for t, i in added.items()
                     if i >= sp.get_piece_size() or sp.is_control(i) or sp.is_unknown(i)}
        added = sorted(added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in added) + ")") if added else None
        # LISA's prompts always start with BOS; a plain tokenizer adds one only if its own template does
        # (decided once here, not per prompt).
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and (mode == "lisa" or tokenizer("a").input_ids[:1] == [bos])
        self.bos_id = bos if adds_bos else None

    def __call__(self, text: str) -> list[int]:
        """Ids of ``text`` with BOS (when the tokenizer uses one) and ``<image>`` -> -200."""
        ids: list[int] = []
        for k, chunk in enumerate(text.split(IMAGE)):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode_chunk(chunk))
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def encode_chunk(self, text: str) -> list[int]:
        """Ids of text that continues a prompt (no BOS, no ``<image>``), e.g. an answer appended for training."""
        if self.mode == "plain":
            return self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        pieces = self._split.split(text) if self._split else [text]
        # 4.31 strips the text on both sides of every added token that is not one of the tokenizer's own
        # special tokens (those are AddedTokens with lstrip=rstrip=False, so they keep their neighbours).
        for i, p in enumerate(pieces):
            if i % 2 == 1 and p not in self.special:
                if i > 0:
                    pieces[i - 1] = pieces[i - 1].rstrip()
                if i + 1 < len(pieces):
                    pieces[i + 1] = pieces[i + 1].lstrip()
        ids: list[int] = []
        for i, p in enumerate(pieces):
            if i % 2 == 1:
                ids.append(self.tokenizer.convert_tokens_to_ids(p))
            elif p:
                ids.extend(self._encode_text(p, first=not ids))
        return ids

    def _encode_text(self, text: str, first: bool) -> list[int]:
        if self._sp is None:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        if self.legacy or first:
            return self._sp.encode(text)
        # legacy=False (GLaMM): 4.31 encodes text that follows an added token with the dummy prefix, then takes
        # the leading "▁" off the first piece (unless the text starts with a space) and looks the rest up as a
        # piece of its own (<unk> when the vocabulary lacks it).
        pieces = self._sp.encode(text, out_type=str)
        if pieces and not text.startswith(" ") and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return [self._sp.piece_to_id(p) for p in pieces]
