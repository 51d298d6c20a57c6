"""LoRA on the language model (peft) and LISA's trainable/frozen split.

LISA trains LoRA adapters on the LLM's ``q_proj``/``v_proj`` plus, in full, the mask decoder, ``text_hidden_fcs``,
``lm_head`` and ``embed_tokens`` (the new ``[SEG]`` row must learn); the CLIP tower, the projector and SAM's
image and prompt encoders stay frozen. Adapters live only inside ``vlm.language_model``, so the vision tower and
SAM (which also have ``q_proj``-like names in some builds) never receive any.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

LISA_TRAINABLE = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")


def _llm_owner(model: nn.Module) -> nn.Module:
    """The module holding ``language_model``: ``model.vlm`` (LISA, GLaMM) or the model itself (Sa2VA)."""
    return model.vlm if hasattr(model, "vlm") else model


def apply_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.05,
               targets: Sequence[str] = ("q_proj", "v_proj")) -> None:
    """Wrap the language model (``model.vlm.language_model``; Sa2VA's ``model.language_model``) with peft LoRA
    adapters (in place)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     task_type="CAUSAL_LM")
    try:
        owner = _llm_owner(model)
        owner.language_model = get_peft_model(owner.language_model, cfg)
    except ValueError as e:  # e.g. target modules that the LLM does not have
        from ..io import InputError

        raise InputError(f"--lora-targets {','.join(targets)}: {str(e).splitlines()[0][:200]}")


def has_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(_llm_owner(model).language_model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and drop peft's wrapper; parameter names return to the plain
    layout that ``save_pretrained`` writes. A model without adapters is returned unchanged."""
    if has_lora(model):
        owner = _llm_owner(model)
        owner.language_model = owner.language_model.merge_and_unload()
    return model


def set_trainable(model: nn.Module, trainable: Sequence[str] = LISA_TRAINABLE, frozen: Sequence[str] = (),
                  train_all: bool = False) -> tuple[int, int]:
    """Mark parameters trainable: LoRA adapters, names containing any of ``trainable`` (or every parameter with
    ``train_all``), minus names containing any of ``frozen``. Returns (trainable, total) parameter counts."""
    n_train = n_total = 0
    for name, p in model.named_parameters():
        on = "lora_" in name or train_all or any(t in name for t in trainable)
        if any(f in name for f in frozen):
            on = False
        p.requires_grad_(on)
        n_total += p.numel()
        n_train += p.numel() if on else 0
    return n_train, n_total
