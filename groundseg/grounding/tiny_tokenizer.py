"""The small byte-level BPE tokenizer that our from-scratch presets (``lisa-tiny``, later ``shapes-demo``) ship.

Trained by :func:`train_tiny_tokenizer` on the prompt templates and a short word list; deterministic, so
``python -m groundseg.grounding.tiny_tokenizer DIR`` rebuilds the shipped files exactly. Byte-level means every
string encodes (no ``<unk>``). ``<unk>`` doubles as padding, as in LISA.
"""

from __future__ import annotations

import sys

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


def train_tiny_tokenizer(vocab_size: int = 640):
    """Train the tokenizer and wrap it as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", padding_side="right", model_max_length=512)
    fast.add_tokens(ADDED)  # normal added tokens, like LISA's [SEG]
    return fast


def main(argv: list[str] | None = None) -> None:
    out = (argv or sys.argv[1:])[0]
    train_tiny_tokenizer().save_pretrained(out)


if __name__ == "__main__":
    main()
