"""A LLaVA-style vision-language model composed from transformers parts.

vision tower (``CLIPVisionModel``) -> projector -> any causal LM that takes ``inputs_embeds``. The image enters the
token sequence where the prompt has ``<image>`` (id :data:`IMAGE_TOKEN_INDEX`): that one id is replaced by the
projected patch features, so a sequence of ``L`` ids embeds to ``L - 1 + num_patches`` positions.

Generation is greedy with the KV cache and keeps the last-layer (post-final-norm) hidden state of every position
it computes, so the states that grounding needs come out of generation itself, with no second forward pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from ..config import VisionConfig
from .tokens import IMAGE_TOKEN_INDEX


def build_projector(kind: str, vision_dim: int, hidden: int) -> nn.Module:
    """``linear`` (LISA, LLaVA v1) or ``mlp2x_gelu`` (LLaVA-1.5, GLaMM); key names match LLaVA's ``mm_projector``."""
    if kind == "linear":
        return nn.Linear(vision_dim, hidden)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    raise ValueError(f"unknown projector {kind!r}; expected 'linear' or 'mlp2x_gelu'")


@dataclass
class Embedded:
    """A batch of prompts with the image spliced in.

    ``inputs_embeds`` (B, T, H); ``attention_mask`` (B, T) bool; ``labels`` (B, T) or None; ``token_ids`` (B, T): the
    id at each embedded position (:data:`IMAGE_TOKEN_INDEX` at image positions, pad id at padding).
    ``region_vectors`` (n, H): the region vectors spliced in at ``<bbox>`` positions (GLaMM), rows then boxes in
    order, or None."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    token_ids: torch.Tensor
    region_vectors: torch.Tensor | None = None


@dataclass
class Generation:
    """Greedy generation output.

    ``token_ids`` (B, T + n): embedded-position ids of prompt then generated tokens (left padding in the prompt
    part); ``new_tokens``: the generated ids per row, up to and including EOS; ``hidden_states`` (B, T + n - 1, H):
    last-layer states of every position that was fed to the model (the final token is never fed);
    ``attention_mask`` (B, T + n)."""

    token_ids: torch.Tensor
    new_tokens: list[list[int]]
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor


class VisionLanguageModel(nn.Module):
    """CLIP tower + projector + causal LM.

    Args:
        vision: the vision tower config.
        projector: ``"linear"`` or ``"mlp2x_gelu"``.
        llm: a transformers config dict with ``model_type``.
    """

    def __init__(self, vision: VisionConfig, projector: str, llm: dict):
        super().__init__()
        self.vision_config = vision
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**vision.clip))
        llm = dict(llm)
        lm_config = AutoConfig.for_model(llm.pop("model_type"), **llm)
        self.projector = build_projector(projector, vision.clip["hidden_size"], lm_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(lm_config)
        fwd = inspect.signature(self.language_model.get_decoder().forward).parameters
        # transformers 5.x calls the KV cache argument `cache`; 4.x called it `past_key_values`.
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    # ----------------------------------------------------------------------------------------- image side

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP-normalised pixels -> (B, N, H) projected image tokens."""
        return self.encode_images_with_levels(pixel_values, ())[0]

    def encode_images_with_levels(self, pixel_values: torch.Tensor, levels: Sequence[int]
                                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Projected image tokens (B, N, H) and, from the same tower pass, the patch states (B, g*g, C) of the
        CLIP ``hidden_states`` indices in ``levels`` (CLS dropped) -- what a region encoder reads."""
        tower = self.vision_tower
        trainable = any(p.requires_grad for p in tower.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(trainable):
            out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
            feats = out.hidden_states[self.vision_config.select_layer]
            if self.vision_config.select_feature == "patch":
                feats = feats[:, 1:]
            level_feats = [out.hidden_states[i][:, 1:] for i in levels]
        return self.projector(feats.to(self.projector_dtype)), level_feats

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # ----------------------------------------------------------------------------------------- splicing

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor, pad_id: int,
              labels: torch.Tensor | None = None, ignore_index: int = -100) -> Embedded:
        """Splice ``image_features`` (B, N, H) into the embeddings of ``input_ids`` (B, L), one image per row.

        Rows are right-padded with ``pad_id``; the attention mask is ``input_ids != pad_id`` as in LISA (so a
        genuine ``<unk>`` equal to the pad id is masked too), extended with ones over the image."""
        b, length = input_ids.shape
        is_image = input_ids == IMAGE_TOKEN_INDEX
        if not bool((is_image.sum(1) == 1).all()):
            raise ValueError("every prompt must contain exactly one <image> placeholder")
        n = image_features.shape[1]
        safe_ids = input_ids.masked_fill(is_image, pad_id)
        text = self.language_model.get_input_embeddings()(safe_ids)
        pos = is_image.float().argmax(1)  # (B,) image index per row
        # Embedded position of each id: ids after the image move by N - 1.
        shift = torch.arange(length, device=input_ids.device)[None] > pos[:, None]
        dest = torch.arange(length, device=input_ids.device)[None] + shift * (n - 1)  # (B, L)
        total = length - 1 + n
        embeds = text.new_zeros(b, total, text.shape[-1])
        token_ids = input_ids.new_full((b, total), IMAGE_TOKEN_INDEX)
        keep = ~is_image
        rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, length)
        embeds[rows[keep], dest[keep]] = text[keep]
        token_ids[rows[keep], dest[keep]] = input_ids[keep]
        img_pos = pos[:, None] + torch.arange(n, device=input_ids.device)[None]  # (B, N)
        embeds[torch.arange(b)[:, None], img_pos] = image_features.to(embeds.dtype)
        attention = token_ids != pad_id
        out_labels = None
        if labels is not None:
            out_labels = labels.new_full((b, total), ignore_index)
            out_labels[rows[keep], dest[keep]] = labels[keep]
        return Embedded(embeds, attention, out_labels, token_ids)

    # ----------------------------------------------------------------------------------------- language side

    def run(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
            position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False):
        """Decoder forward -> (last-layer states after the final norm, cache or None)."""
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), position_ids=position_ids,
            use_cache=use_cache, **kwargs)
        new_cache = getattr(out, "cache", None) if self._cache_kw == "cache" else out.past_key_values
        return out.last_hidden_state, new_cache

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_output_embeddings()(hidden_states)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, token_ids: torch.Tensor,
                 max_new_tokens: int, eos_token_id: int, pad_id: int,
                 continue_with: Callable[[int, int, torch.Tensor], Sequence[int]] | None = None) -> Generation:
        """Greedy decoding with the KV cache from a left-padded prompt batch.

        ``inputs_embeds`` (B, T, H), ``attention_mask`` (B, T), ``token_ids`` (B, T). Every fed position's
        last-layer state is kept, the prompt's from the prefill and one more per step.

        ``continue_with(row, token, state)``, if given, sees each chosen token with the state whose logits chose it
        and may return tokens that row must emit next instead of choosing them (e.g. a box's coordinates read off
        the mask that ``<box>``'s state prompts); they count against ``max_new_tokens`` like chosen ones."""
        b = inputs_embeds.shape[0]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        states, cache = self.run(inputs_embeds, attention_mask, position_ids, use_cache=True)
        all_states = [states]
        ids = [token_ids]
        mask = attention_mask
        new_tokens: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=inputs_embeds.device)
        last = states[:, -1]
        next_pos = position_ids[:, -1:] + 1
        embed = self.language_model.get_input_embeddings()
        queued: list[list[int]] = [[] for _ in range(b)]  # tokens continue_with asked for, per row
        for step in range(max_new_tokens):
            nxt = self.logits(last).argmax(-1)  # (B,)
            for r in range(b):
                if queued[r]:
                    nxt[r] = queued[r].pop(0)
                elif continue_with is not None and not done[r]:
                    queued[r] = list(continue_with(r, int(nxt[r]), last[r]))
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            for r in range(b):
                if not done[r]:
                    new_tokens[r].append(int(nxt[r]))
            ids.append(nxt[:, None])
            mask = torch.cat([mask, (~done)[:, None]], 1)
            done = done | (nxt == eos_token_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            states, cache = self.run(embed(nxt[:, None]), mask, next_pos, cache=cache, use_cache=True)
            all_states.append(states)
            last = states[:, -1]
            next_pos = next_pos + 1
        return Generation(torch.cat(ids, 1), new_tokens, torch.cat(all_states, 1), mask)
