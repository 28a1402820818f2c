"""Class names -> text columns of the attention map, through the tokenizer's own character offsets.

The paper's code re-tokenises every class name on its own and walks the prompt's tokens with a running
counter (``st += len(tokens(name)) - 2``). That breaks when a name tokenises differently in context, when
a name holds punctuation, or when the counter drifts. Here the prompt is built once with the character
span of every name recorded, tokenised once with ``return_offsets_mapping``, and each token is given to
the name whose span it overlaps. Special tokens (BOS, EOS, padding) have empty spans and belong to no
name. Repeated words map by position: in ``"cat cat food"`` the second ``cat`` belongs to ``"cat food"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

__all__ = ["PromptColumns", "check_class_names", "prompt_columns", "pack_prompts", "phrase_columns"]


@dataclass(frozen=True)
class PromptColumns:
    """One prompt and, for each class it names, the text columns (token positions) of that class.

    ``columns[c]`` are positions in the tokenizer's padded sequence, which is also the column order of
    the captured text block for the tokenizer the family reads (CLIP for SD3, T5 for Flux).
    """

    prompt: str
    classes: List[str]
    columns: List[List[int]]


def check_class_names(classes: Sequence[str], argument: str = "classes") -> List[str]:
    """Strip names and reject what cannot be segmented: no names, empty names, duplicates."""
    if isinstance(classes, str):
        raise TypeError(
            f"{argument} must be a list of class names, not one string; did you mean {classes.split(',')!r}?"
        )
    names = [str(c).strip() for c in classes]
    if not names:
        raise ValueError(f"{argument} is empty: give at least one class name, e.g. ['cat', 'grass', 'sky']")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{argument} has empty names at positions {empty}")
    seen, dup = set(), []
    for n in names:
        key = " ".join(n.lower().split())
        if key in seen:
            dup.append(n)
        seen.add(key)
    if dup:
        raise ValueError(f"{argument} has duplicate names (case-insensitive): {sorted(set(dup))}")
    return names


def _encode_offsets(tokenizer, text: str, max_length: int):
    enc = tokenizer(
        text,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_offsets_mapping=True,
    )
    return enc["input_ids"], enc["offset_mapping"]


def phrase_columns(tokenizer, prompt: str, spans: Sequence[tuple], max_length: int) -> List[List[int]]:
    """Token positions of each character span ``(start, stop)`` of ``prompt`` (may be empty if truncated)."""
    _, offsets = _encode_offsets(tokenizer, prompt, max_length)
    columns: List[List[int]] = [[] for _ in spans]
    for pos, (a, b) in enumerate(offsets):
        if b <= a:  # special or padding token
            continue
        for c, (s, e) in enumerate(spans):
            if a < e and b > s:
                columns[c].append(pos)
                break
    return columns


def prompt_columns(tokenizer, classes: Sequence[str], max_length: int, separator: str = " ",
                   columns: Optional[Callable] = None) -> PromptColumns:
    """Join ``classes`` with ``separator`` (the paper's prompt) and find each class's columns.

    ``columns(prompt, spans) -> [[int]]``: where a family's pipeline puts the prompt's tokens in the text block
    (a chat template, a dropped prefix, left padding); default :func:`phrase_columns` of the plain tokenizer.
    Raises if a class gets no column (the prompt was truncated at ``max_length``).
    """
    names = list(classes)
    spans, parts, cursor = [], [], 0
    for i, n in enumerate(names):
        if i:
            parts.append(separator)
            cursor += len(separator)
        spans.append((cursor, cursor + len(n)))
        parts.append(n)
        cursor += len(n)
    prompt = "".join(parts)
    if columns is None:
        columns = phrase_columns(tokenizer, prompt, spans, max_length)
    else:
        columns = columns(prompt, spans)
    missing = [n for n, c in zip(names, columns) if not c]
    if missing:
        raise ValueError(
            f"classes {missing} got no text token: the prompt {prompt!r} is longer than {max_length} tokens "
            "(use pack_prompts to split it) or the names are made of characters the tokenizer drops"
        )
    return PromptColumns(prompt, names, columns)


def _name_length(tokenizer, name: str, max_length: int) -> int:
    _, offsets = _encode_offsets(tokenizer, name, max_length)
    return sum(1 for a, b in offsets if b > a)


def pack_prompts(
    tokenizer, classes: Sequence[str], max_length: int, separator: str = " ", max_classes: int | None = None,
    balance: bool = True, columns: Optional[Callable] = None,
) -> List[PromptColumns]:
    """Split ``classes`` over as few prompts as fit in ``max_length`` tokens, in the given order.

    Capacity is ``max_length`` minus the special tokens the tokenizer adds (BOS+EOS for CLIP, EOS for T5),
    minus one spare column so that every prompt keeps at least one end/padding token, as the paper's
    prompts do. ``max_classes`` caps the classes of one prompt (e.g. to keep each prompt as short as the
    paper's ground-truth prompts). Each class lands in exactly one prompt.

    ``balance``: once the number of prompts n is known, classes are spread evenly (at most ceil(C / n) per
    prompt) instead of filling the first prompts and leaving a short last one. A class's attention share
    depends on how many other names compete with it in its prompt, so even prompts keep scores from
    different prompts comparable. ``columns``: as :func:`prompt_columns`.
    """
    names = list(classes)
    enc = tokenizer("", add_special_tokens=True)  # the special tokens every prompt carries
    n_special = max(len(enc["input_ids"]), 1)
    capacity = max_length - n_special - 1
    lengths = [_name_length(tokenizer, n, max_length) for n in names]
    for n, length in zip(names, lengths):
        if length > capacity:
            raise ValueError(f"class name {n!r} is {length} tokens, longer than one prompt holds ({capacity})")
    sep = _name_length(tokenizer, separator, max_length)

    def greedy(cap_classes):
        packs: List[List[str]] = [[]]
        used = 0
        for n, length in zip(names, lengths):
            extra = sep if packs[-1] else 0
            full = cap_classes is not None and len(packs[-1]) >= cap_classes
            if packs[-1] and (used + extra + length > capacity or full):
                packs.append([])
                used, extra = 0, 0
            packs[-1].append(n)
            used += extra + length
        return packs

    packs = greedy(max_classes)
    if balance and len(packs) > 1:
        even = -(-len(names) // len(packs))
        balanced = greedy(even if max_classes is None else min(even, max_classes))
        if len(balanced) == len(packs):
            packs = balanced
    return [prompt_columns(tokenizer, p, max_length, separator, columns) for p in packs]
