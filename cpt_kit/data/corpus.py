"""Read, clean and deduplicate the documents of a list of sources as a stream, counting every drop.

`clean_documents(sources, options, cleaning, stats)` yields `(text, origin)` for each kept
document, in source order, holding no document after it is yielded: memory is one document
plus the deduplication indexes (a 16-byte hash per kept document, and the MinHash index).
`CorpusStats` counts documents read/kept per source, drops by reason, and long documents cut
into pieces.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from cpt_kit.data.clean import clean_text, length_reason
from cpt_kit.data.dedup import ExactDeduper, NearDeduper
from cpt_kit.data.sources import ReadOptions, Source, read_documents
from cpt_kit.data.text_files import LongDocuments, ReplacementCounter

DROP_REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")
MAX_LISTED_SOURCES = 50


@dataclass(frozen=True)
class Cleaning:
    collapse_whitespace: bool
    min_chars: int
    max_chars: Optional[int]
    dedup_exact: bool
    dedup_near: bool
    near_dup_threshold: float


@dataclass
class CorpusStats:
    split_by: str = "paragraph"
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    long: LongDocuments = field(default_factory=LongDocuments)
    replacements: ReplacementCounter = field(default_factory=ReplacementCounter)
    stopped_early: bool = False
    """Reading stopped before the end of the sources because enough text was read (replay)."""

    def drops_summary(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in self.dropped.items() if n) or "none"

    def stats(self) -> dict:
        listed = (self.per_source if len(self.per_source) <= MAX_LISTED_SOURCES
                  else f"(more than {MAX_LISTED_SOURCES} sources: not listed)")
        return {"read": self.read, "kept": self.kept, "split_by": self.split_by,
                "dropped": {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS},
                "long_documents": self.long.stats(), "replacement_chars": self.replacements.count,
                "sources": len(self.per_source), "per_source": listed, "stopped_early": self.stopped_early}


def clean_documents(sources: list[Source], options: ReadOptions, cleaning: Cleaning,
                    stats: CorpusStats) -> Iterator[tuple[str, str]]:
    """Cleaned, length-filtered, deduplicated documents in source order."""
    exact = ExactDeduper() if cleaning.dedup_exact else None
    near = NearDeduper(cleaning.near_dup_threshold) if cleaning.dedup_near else None
    for source in sources:
        counts = stats.per_source.setdefault(str(source), {"read": 0, "kept": 0})
        for raw, origin in read_documents(source, options, stats.replacements, stats.long):
            counts["read"] += 1
            stats.read += 1
            text = clean_text(raw, cleaning.collapse_whitespace)
            reason = length_reason(text, cleaning.min_chars, cleaning.max_chars)
            if reason is None and exact is not None and exact.is_duplicate(text):
                reason = "exact_duplicate"
            if reason is None and near is not None and near.is_duplicate(text):
                reason = "near_duplicate"
            if reason is not None:
                stats.dropped[reason] += 1
                continue
            counts["kept"] += 1
            stats.kept += 1
            yield text, origin
