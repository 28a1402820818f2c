"""Class names -> text columns of the attention map, through the tokenizer's own character offsets.

The paper's code re-tokenises every class name on its own and walks the prompt's tokens with a running
counter (``st += len(tokens(name)) - 2``). That breaks when a name tokenises differently in context, when
a name holds punctuation, or when the counter drifts. Here the prompt is built once with the character
span of every name recorded, tokenised once with ``return_offsets_mapping``, and each token is given to
the name whose span it overlaps. Special tokens (BOS, EOS, padding) have empty spans and belong to no
name. Repeated words map by position: in ``"cat cat food"`` the second ``cat`` belongs to ``"cat food"``.

In a free prompt (``generate``, MAGNET's captions) the names are found by :func:`name_spans`, one rule for every
family and for MAGNET: whole words, case-insensitive, any run of whitespace between a name's words; longer names
first, and each character of the prompt belongs to at most one class (in ``"a traffic light near a light pole"``
``"traffic light"`` takes its two words and ``"light"`` the second ``light`` only); every occurrence counts.
Character spans become token columns in :func:`span_columns`, the one place that decides which class a token
belongs to, whatever tokenizer, chat template or piecewise tokenisation produced the offsets.
"""
from __future__ import annotations

import numbers
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["PromptColumns", "check_class_names", "prompt_columns", "pack_prompts", "phrase_columns", "name_spans",
           "span_columns", "name_key"]

Span = Tuple[int, int]


@dataclass(frozen=True)
class PromptColumns:
    """One prompt and, for each class it names, the text columns (token positions) of that class.

    ``columns[c]`` are positions in the tokenizer's padded sequence, which is also the column order of
    the captured text block for the tokenizer the family reads (CLIP for SD3, T5 for Flux).
    """

    prompt: str
    classes: List[str]
    columns: List[List[int]]


def name_key(name: str) -> str:
    """What makes two class names the same name: case and runs of whitespace do not count."""
    return " ".join(name.lower().split())


# control characters (newline, tab, NUL ...), line / paragraph separators, lone surrogates (undecodable argv bytes)
_BAD_CATEGORIES = {"Cc": "a control character", "Zl": "a line separator", "Zp": "a paragraph separator",
                   "Cs": "an undecodable byte (lone surrogate)"}


def check_class_names(classes: Sequence[str], argument: str = "classes") -> List[str]:
    """Strip names and reject what cannot be segmented: no names, empty names, duplicates, names holding a control
    character (a newline, a tab ...), which no prompt, legend or file name can show."""
    if isinstance(classes, str):
        raise TypeError(
            f"{argument} must be a list of class names, not one string; did you mean {classes.split(',')!r}?"
        )
    names = list(classes)
    odd = [(i, c) for i, c in enumerate(names) if not isinstance(c, str)]
    if odd:  # str(None) would be the class 'None', str(3) the class '3'
        i, c = odd[0]
        raise TypeError(f"{argument}: class names must be strings, got {c!r} ({type(c).__name__}) at position {i}")
    names = [c.strip() for c in names]
    if not names:
        raise ValueError(f"{argument} is empty: give at least one class name, e.g. ['cat', 'grass', 'sky']")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{argument} has empty names at positions {empty}")
    for n in names:
        bad = next((ch for ch in n if unicodedata.category(ch) in _BAD_CATEGORIES), None)
        if bad is not None:
            raise ValueError(f"{argument}: the class name {n!r} holds {_BAD_CATEGORIES[unicodedata.category(bad)]} "
                             f"({bad!r}); give names of printable characters")
    seen, dup = set(), []
    for n in names:
        key = name_key(n)
        if key in seen:
            dup.append(n)
        seen.add(key)
    if dup:
        raise ValueError(f"{argument} has duplicate names (case-insensitive): {sorted(set(dup))}")
    return names


def _encode_offsets(tokenizer, text: str, max_length: Optional[int]):
    """Ids and character offsets of ``text`` padded and truncated to ``max_length`` (None: all of its tokens)."""
    if max_length is None:  # a bound no text reaches: counting tokens is not feeding a model (no length warning)
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
                        max_length=1 << 30)
    else:
        enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                        return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def name_spans(text: str, names: Sequence[str]) -> List[List[Span]]:
    """Every occurrence of each name in ``text``: ``spans[c]`` = the character spans ``(start, stop)`` of name ``c``,
    in order (``[]`` where it does not occur). A name matches as whole words (no letter, digit or ``_`` touches it on
    either side), case-insensitively, with any run of whitespace between its words. Longer names match first and a
    character claimed by one name is never part of another's match: in ``"a traffic light near a light pole"`` with
    ``["light", "traffic light"]``, ``"traffic light"`` gets ``(2, 15)`` and ``"light"`` only ``(23, 28)``. Names that
    are the same name (:func:`name_key`) get the same spans."""
    keys = [name_key(n) for n in names]
    words = {}  # key -> the words of its first name
    for k, n in zip(keys, names):
        words.setdefault(k, n.split())
    found = {}
    taken = [False] * len(text)
    # longest first (in characters, then in the given order): a name inside a longer one never takes its words
    for key in sorted((k for k in words if k), key=len, reverse=True):
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words[key]) + r"(?!\w)", re.IGNORECASE)
        spans, at = [], 0
        while (m := pattern.search(text, at)) is not None:
            if any(taken[m.start():m.end()]):  # inside a longer name: look again one character on
                at = m.start() + 1
                continue
            spans.append(m.span())
            at = m.end()
        for s, e in spans:
            taken[s:e] = [True] * (e - s)
        found[key] = spans
    return [list(found.get(k, [])) for k in keys]


def _as_span_lists(spans) -> List[List[Span]]:
    """One list of character spans per class: ``(start, stop)`` (one span), a list of them, or None (none)."""
    out = []
    for sp in spans:
        if sp is None:
            out.append([])
        elif len(sp) == 2 and all(isinstance(v, numbers.Integral) for v in sp):  # numpy ints too
            out.append([(int(sp[0]), int(sp[1]))])
        else:
            out.append([(int(s), int(e)) for s, e in sp])
    return out


def span_columns(offsets: Sequence[Span], spans, shift: int = 0) -> List[List[int]]:
    """The one rule from character spans to token positions: ``columns[c]`` = the positions ``pos`` (in order) of the
    tokens whose character offsets ``offsets[pos]`` overlap a span of class ``c`` (``spans[c]``: a ``(start, stop)``,
    a list of them, or None), ``shift`` added to every span first (where the prompt sits in a templated text).
    Special and padding tokens (empty offsets) belong to no class; a token that overlaps spans of several classes
    (a tokenizer that merges across a name's edge) belongs to the one it overlaps most, the first on a tie: a token
    is never a column of two classes."""
    lists = [[(s + shift, e + shift) for s, e in sp] for sp in _as_span_lists(spans)]
    columns: List[List[int]] = [[] for _ in lists]
    for pos, (a, b) in enumerate(offsets):
        if b <= a:  # special or padding token
            continue
        best, best_overlap = None, 0
        for c, sp in enumerate(lists):
            overlap = sum(max(0, min(b, e) - max(a, s)) for s, e in sp)
            if overlap > best_overlap:
                best, best_overlap = c, overlap
        if best is not None:
            columns[best].append(pos)
    return columns


def phrase_columns(tokenizer, prompt: str, spans, max_length: int) -> List[List[int]]:
    """Token positions (:func:`span_columns`) of each class's character spans of ``prompt`` in the tokenizer's
    sequence padded / truncated to ``max_length`` (a class may get none if truncated)."""
    _, offsets = _encode_offsets(tokenizer, prompt, max_length)
    return span_columns(offsets, spans)


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


def _name_length(tokenizer, name: str) -> int:
    """The tokens of ``name`` alone (all of them: a name longer than a prompt is reported with its real count)."""
    _, offsets = _encode_offsets(tokenizer, name, None)
    return sum(1 for a, b in offsets if b > a)


def pack_prompts(
    tokenizer, classes: Sequence[str], max_length: int, separator: str = " ", max_classes: int | None = None,
    balance: bool = True, columns: Optional[Callable] = None,
) -> List[PromptColumns]:
    """Split ``classes`` over as few prompts as fit in ``max_length`` tokens, in the given order.

    Capacity is ``max_length`` minus the special tokens the tokenizer adds (BOS+EOS for CLIP, EOS for T5): the
    paper's 77-token CLIP window holds BOS + 75 name tokens + EOS, so a prompt of 75 tokens is one prompt, and
    every prompt keeps its end token. ``max_classes`` caps the classes of one prompt (e.g. to keep each prompt as short as the
    paper's ground-truth prompts). Each class lands in exactly one prompt.

    ``balance``: once the number of prompts n is known, classes are spread evenly (at most ceil(C / n) per
    prompt, or the smallest cap above it that keeps n prompts) instead of filling the first prompts and leaving a
    short last one. A class's attention share
    depends on how many other names compete with it in its prompt, so even prompts keep scores from
    different prompts comparable. ``columns``: as :func:`prompt_columns`.
    """
    names = list(classes)
    enc = tokenizer("", add_special_tokens=True)  # the special tokens every prompt carries
    n_special = max(len(enc["input_ids"]), 1)
    capacity = max_length - n_special
    lengths = [_name_length(tokenizer, n) for n in names]
    for n, length in zip(names, lengths):
        if length > capacity:
            shown = repr(n) if len(n) <= 60 else f"{n[:40]!r}... ({len(n)} characters)"
            raise ValueError(f"class name {shown} is {length} tokens, longer than one prompt holds ({capacity})")
    sep = _name_length(tokenizer, separator)

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
        # the smallest cap on classes per prompt that still packs them in as many prompts: ceil(C / n) when the
        # names fit that evenly, a little more when long names make a prompt full earlier
        top = max(len(p) for p in packs)
        for cap in range(-(-len(names) // len(packs)), top):
            balanced = greedy(cap)
            if len(balanced) == len(packs):
                packs = balanced
                break
    return [prompt_columns(tokenizer, p, max_length, separator, columns) for p in packs]
