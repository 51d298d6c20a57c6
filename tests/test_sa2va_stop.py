"""Stop words that are not one token (Sa2VA-4B: phi3's "<|end|>" on a Qwen2.5 tokenizer)."""

from __future__ import annotations

import copy

from groundseg import load_model


def test_a_multi_token_stop_word_cuts_the_answer_where_its_text_appears():
    m = load_model("sa2va-tiny")
    tok = m.tokenizer
    assert len(tok.tokenize("<|end|>")) > 1  # not a token of this vocabulary
    cfg = copy.deepcopy(m.config)
    cfg.template = "phi3_chat"
    phi3 = type(m)(cfg, tok)  # building no longer fails for want of a one-token stop word
    assert phi3.stop_ids == [] and phi3.generate_eos == tok.eos_token_id
    ids = tok.encode("Sure, [SEG].<|end|> and [SEG]", add_special_tokens=False)
    cut = phi3.stop_cut(ids)
    assert tok.decode(ids[:cut + 1]) == "Sure, [SEG].<|end|>"  # the second [SEG] is past the stop
    assert phi3.stop_cut(tok.encode("Sure, [SEG].", add_special_tokens=False)) is None
    # one-token stop words behave as before: qwen_chat stops at <|im_end|>
    ids = tok.encode("Sure, [SEG].", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>"), 5]
    assert m.stop_cut(ids) == len(ids) - 2
