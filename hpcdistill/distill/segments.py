"""Sentence segments of a response, as token positions (the G_i of seed 002 section 3).

Seed 002 aggregates token margins over "NLTK-tokenized sentence segments" (A.11: "NLTK-style
sentence/punctuation segments"). Here: NLTK's Punkt sentence splitter, used untrained (its
default parameters need no downloaded data, so nothing is ever fetched), plus, by default, a break
after every newline run, since reasoning traces put steps, equations and code on their own lines
(`mask.segment_newlines`; false = pure Punkt, which never splits at a bare newline). The newline
breaks add segments, so they raise the n of the release rule's BIC test (docs/objectives.md).

A token belongs to the sentence in which its first non-whitespace character lies; a token made
only of whitespace stays with the sentence before it. Segments are therefore contiguous,
non-empty, in response order, and cover every token position exactly once.
"""

from __future__ import annotations

import bisect
import functools
import re
from typing import Sequence

from nltk.tokenize.punkt import PunktSentenceTokenizer

_NEWLINE_RUN = re.compile(r"\n+")


@functools.lru_cache(maxsize=1)
def _punkt() -> PunktSentenceTokenizer:
    # Untrained: default parameters, no abbreviation list, no network and no nltk_data lookup.
    return PunktSentenceTokenizer()


def sentence_starts(text: str, newlines: bool = True) -> list[int]:
    """Character offsets where a sentence begins in `text` (sorted, without duplicates);
    `newlines`: also after every newline run."""
    starts = {start for start, _ in _punkt().span_tokenize(text)}
    if newlines:
        starts.update(match.end() for match in _NEWLINE_RUN.finditer(text) if match.end() < len(text))
    return sorted(starts)


def segments_from_offsets(text: str, token_starts: Sequence[int], newlines: bool = True) -> list[list[int]]:
    """Segments of token positions, given the response text and each token's start offset in it.

    text: the decoded response; token_starts: [T] character offset of each token, non-decreasing.
    Returns a list of segments, each a list of consecutive token positions. `newlines`: break
    after newline runs too (`mask.segment_newlines`).
    """
    if any(b < a for a, b in zip(token_starts, token_starts[1:])):
        raise ValueError("token_starts must be non-decreasing")
    token_ends = list(token_starts[1:]) + [len(text)]
    starts = sentence_starts(text, newlines)
    segments: list[list[int]] = []
    current_id = None
    for position, (start, end) in enumerate(zip(token_starts, token_ends)):
        piece = text[start:end]
        stripped = len(piece) - len(piece.lstrip())
        if stripped == len(piece) and segments:
            sentence_id = current_id  # whitespace-only token: stays with the sentence before it
        else:
            sentence_id = bisect.bisect_right(starts, start + stripped)
        if sentence_id != current_id:
            segments.append([])
            current_id = sentence_id
        segments[-1].append(position)
    return segments


def sentence_segments(token_texts: Sequence[str], newlines: bool = True) -> list[list[int]]:
    """Segments of token positions from the decoded text of each response token.

    token_texts: [T] decoded piece per token (their concatenation is the response text).
    Returns segments covering positions 0..T-1 exactly once, in order; [] for an empty response.
    `newlines`: break after newline runs too (`mask.segment_newlines`, default true).
    """
    token_starts, offset = [], 0
    for piece in token_texts:
        token_starts.append(offset)
        offset += len(piece)
    return segments_from_offsets("".join(token_texts), token_starts, newlines)
