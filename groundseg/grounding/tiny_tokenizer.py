"""The small byte-level BPE tokenizers that our from-scratch presets (``lisa-tiny``, ``shapes-demo``) ship.

Trained by :func:`train_tiny_tokenizer` on the prompt templates and a short word list; deterministic, so
``python -m groundseg.grounding.tiny_tokenizer DIR`` rebuilds the shipped files exactly. Byte-level means every
string encodes (no ``<unk>``). ``<unk>`` doubles as padding, as in LISA.
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

from ..config import LLAVA_V1_SYSTEM
from .tokens import BBOX, BOX_END, BOX_START, IM_END, IM_PATCH, IM_START, P_END, P_START, REF_END, REF_START, SEG

SPECIAL = ["<unk>", "<s>", "</s>"]
ADDED = [IM_PATCH, IM_START, IM_END, SEG, P_START, P_END, REF_START, REF_END, BOX_START, BOX_END, BBOX]

_WORDS = """
what is the in this image please output segmentation mask respond with can you segment sure it result
where which a an of on left right top bottom middle center above below behind front next to near far
red green blue yellow orange purple pink brown black white gray grey colour color small large big tiny
circle square triangle star hexagon diamond ellipse rectangle shape shapes object objects all every
first second third fourth last largest smallest biggest leftmost rightmost topmost highest lowest
dog cat person man woman child car truck bus bike chair table bed window door cup bottle plate food
one two three four five six seven eight corners sides round grass sky sun sea moving moves static
and or not that has have with without from into out up down over under between among other same
describe region box bbox caption picture photo scene there are here its their this these those
""".split()


def corpus() -> list[str]:
    lines = [LLAVA_V1_SYSTEM, "USER: ASSISTANT:"]
    for w in _WORDS:
        lines += [w, f"the {w}", f"What is the {w} in this image? Please output segmentation mask.",
                  f"Can you segment the {w} in this image?", f"Please segment the {w} in this image.",
                  "It is [SEG].", "Sure, [SEG].", "Sure, the segmentation result is [SEG]."]
    lines += [f"({x},{y}),({x + 1},{y + 2})" for x in range(0, 1000, 37) for y in range(0, 1000, 113)]
    return lines


def train_tokenizer(lines: list[str], vocab_size: int, split_digits: bool = False, seg_lstrip: bool = False,
                    phrases: Sequence[str] = ()):
    """Train a byte-level BPE on ``lines`` and wrap it as a ``transformers`` fast tokenizer with the grounding
    tokens added. ``split_digits`` makes every digit its own token, so box coordinates on the 0-1000 grid are
    spelled the same way at every magnitude. ``seg_lstrip`` lets ``[SEG]`` swallow the space before it, so in
    ``"the red circle [SEG]"`` the token before ``[SEG]`` -- whose state prompts SAM -- is ``circle``, not a
    content-free space. ``phrases`` become single tokens (matched longest first, leading space included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", padding_side="right", model_max_length=512)
    if seg_lstrip:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(t, lstrip=True, normalized=False) if t == SEG else t for t in ADDED])
    else:
        fast.add_tokens(ADDED)  # normal added tokens, like LISA's [SEG]
    if phrases:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(p, normalized=False) for p in phrases])
    return fast


def train_tiny_tokenizer(vocab_size: int = 640):
    """The ``lisa-tiny`` tokenizer."""
    return train_tokenizer(corpus(), vocab_size)


def shapes_corpus(num_images: int = 400, seed: int = 9999) -> list[str]:
    """Everything the shapes world and the training templates say, from images of a seed never used for
    training or testing."""
    from ..config import SHAPES_SYSTEM
    from ..datasets.shapes import ShapesWorld
    from ..train.data import ANSWERS, BOX_SUFFIX, CAPTION_QUESTIONS, GROUNDED_ANSWERS, MULTI_QUESTIONS, QUESTIONS

    # Answers follow "ASSISTANT:" after a space (train/data.py), so they are learnt with their leading space.
    lines = [SHAPES_SYSTEM, "USER: ASSISTANT:", " Sure, ", " and ", *[" " + a for a in ANSWERS],
             *CAPTION_QUESTIONS, BOX_SUFFIX, *[str(i) for i in range(10)]]
    world = ShapesWorld(seed=seed)
    for i in range(num_images):
        item = world.image(i)
        for e in item.expressions:
            lines += [q.format(e.text) for q in (QUESTIONS if e.kind != "multi" else MULTI_QUESTIONS)]
            lines += [" " + a.replace("{}", e.text) for a in GROUNDED_ANSWERS[1:]]
        # The shipped shapes-demo tokenizer was trained when captions began "From left to right:" (they now begin
        # "There are"); BPE sees only word counts, which the order of the listed objects does not change, so the
        # corpus keeps the old opening and rebuilds that tokenizer exactly.
        caption = re.sub(r"^There are ", "From left to right: ", item.caption)
        lines += [" " + caption + ".", *[" " + a for a in ANSWERS]]  # answer words as often as questions
        for b in item.box_answers:
            lines += [b.question + BOX_SUFFIX, " " + b.answer]
        lines += [r.question + " " + r.answer for r in item.region_questions]
    return lines


def shapes_name_phrases() -> list[str]:
    """Every multi-word object name of the shapes world, singular and plural, with its leading space
    (" small red circle", " red shapes", " large triangle", ...).

    shapes-demo spells each of them as ONE token. Its 3-layer LLM is trained from random weights in 45 CPU
    minutes, and in that time it does not learn to carry earlier words into the state before ``[SEG]``: with
    word-level tokens, "the red shape" and "the blue shape" gave that state a cosine similarity of 1.00, so the
    mask decoder could not tell them apart. With one token per name the state before ``[SEG]`` is the name's
    own token. (A pretrained LLM, as in LISA, needs none of this.)"""
    from ..datasets.shapes import COLORS, SHAPES, SIZES

    out = []
    for size in (None, *SIZES):
        for color in (None, *COLORS):
            if size is None and color is None:
                continue
            for noun in (*SHAPES, "shape"):
                words = " ".join(w for w in (size, color) if w)
                out += [f" {words} {noun}", f" {words} {noun}s"]
    return out


def train_shapes_tokenizer(vocab_size: int = 640):
    """The ``shapes-demo`` tokenizer."""
    return train_tokenizer(shapes_corpus(), vocab_size, split_digits=True, seg_lstrip=True,
                           phrases=shapes_name_phrases())


def main(argv: list[str] | None = None) -> None:
    """``python -m groundseg.grounding.tiny_tokenizer DIR [lisa-tiny|shapes-demo]``."""
    args = argv if argv is not None else sys.argv[1:]
    which = args[1] if len(args) > 1 else "lisa-tiny"
    tok = {"lisa-tiny": train_tiny_tokenizer, "shapes-demo": train_shapes_tokenizer}[which]()
    tok.save_pretrained(args[0])


if __name__ == "__main__":
    main()
