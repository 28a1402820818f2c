"""Learnable prompt tokens (the official ``USE_LEARNABLE_TOKENS``): trained with MAGNET, saved beside the LoRA, used
by ``segment`` / ``eval --lora``.

What the official code does (cvlab-kaist/Seg4Diff at bb500ca):

- ``sd3_backbone.py`` l. 153-175: ``prompt_tokens = nn.Parameter(prompt_embeds[0])`` with ``prompt_embeds`` from
  ``pipe.encode_prompt(prompt="")`` (diffusers' default ``max_sequence_length`` 256, T5 not loaded: 77 CLIP +
  256 zero vectors = 333 tokens x 4096), and the empty prompt's ``pooled_prompt_embeds`` kept fixed.
- l. 240-245: every forward passes ``encoder_hidden_states=self.prompt_tokens`` (``[L, 4096]``, broadcast over
  the batch by the blocks' adaptive norms) and ``pooled_projections=self.pooled_prompt_embeds`` *instead of* the
  prompt's embeddings. The prompt still decides which text columns are a class's (the tokenizer's positions of its
  name), so the tokens learn, position by position, what the mask loss asks of those columns.
- ``train_net.py`` l. 403-405: with ``USE_LEARNABLE_TOKENS`` the optimizer takes only parameters named
  ``prompt_tokens``: the LoRA and the residual map head stay at their initial values (the head is still applied
  in the loss). Learning rate BASE_LR (no multiplier is ever applied), AdamW weight decay 1e-4.

:class:`PromptTokens` holds ``[1, L, D]`` tokens and ``[1, P]`` pooled embeddings; :class:`PromptTokensFamily`
makes a Segmenter's family feed them to the transformer instead of its prompts' embeddings. SD3 / SD3.5 only.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["TOKENS_FILE", "PromptTokens", "PromptTokensFamily", "save_prompt_tokens", "load_prompt_tokens"]

TOKENS_FILE = "prompt_tokens.safetensors"
T5_TOKENS = 256  # diffusers' encode_prompt default, which the official init uses: 77 + 256 = 333 tokens


class PromptTokens(nn.Module):
    """``embeds`` ``[1, L, D]`` (trained) and ``pooled`` ``[1, P]`` (a buffer, fixed). ``forward(B)`` -> the
    transformer's text keyword arguments for a batch of ``B``."""

    def __init__(self, embeds: torch.Tensor, pooled: torch.Tensor):
        super().__init__()
        if embeds.dim() != 3 or embeds.shape[0] != 1 or pooled.dim() != 2 or pooled.shape[0] != 1:
            raise ValueError(f"prompt tokens must be embeds [1, L, D] and pooled [1, P], got {tuple(embeds.shape)} "
                             f"and {tuple(pooled.shape)}")
        self.embeds = nn.Parameter(embeds.detach().clone().float())
        self.register_buffer("pooled", pooled.detach().clone().float())

    @classmethod
    @torch.no_grad()
    def from_pipeline(cls, pipe, t5_tokens: int = T5_TOKENS) -> "PromptTokens":
        """The official init: the empty prompt's embeddings (T5 not run: ``t5_tokens`` zero vectors, as the paper
        loads SD3 without T5)."""
        te3 = getattr(pipe, "text_encoder_3", None)
        pipe.text_encoder_3 = None
        try:
            pe, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=t5_tokens,
                                                  device=pipe.transformer.device)
        finally:
            pipe.text_encoder_3 = te3
        return cls(pe, pooled)

    def forward(self, batch: int, dtype: Optional[torch.dtype] = None) -> dict:
        e, p = self.embeds, self.pooled
        if dtype is not None:
            e, p = e.to(dtype), p.to(dtype)
        return dict(encoder_hidden_states=e.expand(batch, -1, -1), pooled_projections=p.expand(batch, -1))


class PromptTokensFamily:
    """A Segmenter family (``segmenter.spec``) whose ``encode_prompts`` returns the learned tokens for every prompt;
    everything else (where a class's columns are, the forward, the schedule) is the wrapped family's."""

    def __init__(self, inner, tokens: PromptTokens):
        if getattr(inner, "name", None) not in ("sd3", "sd3.5"):
            raise ValueError("learnable prompt tokens are trained on SD3 / SD3.5, not "
                             f"{getattr(inner, 'name', inner)!r}")
        self._inner, self.tokens = inner, tokens.eval()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, protocol) -> dict:
        t = self.tokens.to(pipe.transformer.device)
        return t(len(prompts), dtype=pipe.transformer.dtype)


def save_prompt_tokens(tokens: PromptTokens, folder: str) -> str:
    """``folder/prompt_tokens.safetensors`` (``embeds``, ``pooled``); returns the file."""
    from safetensors.torch import save_file

    path = os.path.join(folder, TOKENS_FILE)
    save_file({"embeds": tokens.embeds.detach().cpu().contiguous(),
               "pooled": tokens.pooled.detach().cpu().contiguous()}, path)
    return path


def load_prompt_tokens(path: str) -> Optional[PromptTokens]:
    """The tokens saved beside a LoRA (``path``: its folder or the LoRA file), or None when there are none."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, TOKENS_FILE)
    if not os.path.isfile(file):
        return None
    from safetensors.torch import load_file

    try:
        sd = load_file(file)
        return PromptTokens(sd["embeds"], sd["pooled"])
    except Exception as e:  # safetensors' own errors, a missing key, wrong shapes
        raise ValueError(f"{file}: not prompt tokens saved by seg4diff-fast train ({e})") from e
