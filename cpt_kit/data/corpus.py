"""Read, clean and deduplicate the documents of a list of sources, counting every drop by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from cpt_kit.data.clean import clean_text, length_reason
from cpt_kit.data.dedup import ExactDeduper, NearDeduper
from cpt_kit.data.sources import ReadOptions, ReplacementCounter, Source, read_documents

DROP_REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")


@dataclass
class CleanCorpus:
    texts: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    replacement_chars: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict:
        return {"read": self.read, "kept": len(self.texts),
                "dropped": {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS},
                "replacement_chars": self.replacement_chars, "sources": len(self.per_source),
                "per_source": self.per_source if len(self.per_source) <= 50 else "(more than 50 sources: not listed)"}


def build_corpus(sources: list[Source], options: ReadOptions, *, min_chars: int, max_chars: Optional[int],
                 dedup_exact: bool, dedup_near: bool, near_dup_threshold: float,
                 on_document: Callable[[], None] | None = None) -> CleanCorpus:
    """Cleaned, length-filtered, deduplicated documents in source order."""
    corpus = CleanCorpus()
    counter = ReplacementCounter()
    exact = ExactDeduper() if dedup_exact else None
    near = NearDeduper(near_dup_threshold) if dedup_near else None
    for source in sources:
        count = 0
        for raw, origin in read_documents(source, options, counter):
            count += 1
            corpus.read += 1
            if on_document is not None:
                on_document()
            text = clean_text(raw)
            reason = length_reason(text, min_chars, max_chars)
            if reason is None and exact is not None and exact.is_duplicate(text):
                reason = "exact_duplicate"
            if reason is None and near is not None and near.is_duplicate(len(corpus.texts), text):
                reason = "near_duplicate"
            if reason is not None:
                corpus.dropped[reason] += 1
                continue
            corpus.texts.append(text)
            corpus.origins.append(origin)
        corpus.per_source[str(source)] = corpus.per_source.get(str(source), 0) + count
    corpus.replacement_chars = counter.count
    return corpus
