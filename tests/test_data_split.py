"""The held-out split: deterministic by content, at least one document, grown to a minimum in tokens."""

from __future__ import annotations

import numpy as np

from cpt_kit.data.split import choose_heldout, split_position


def _positions(texts, seed=0):
    return np.array([split_position(t, seed) for t in texts])


def test_split_is_deterministic_by_content_and_order_free():
    texts = [f"dokumento {i} kun iom da teksto" for i in range(400)]
    tokens = np.full(400, 10)
    held = choose_heldout(_positions(texts), tokens, 0.1, need_tokens=0, max_share=0.5).mask
    assert 20 <= held.sum() <= 60
    shuffled = list(reversed(texts))
    held_shuffled = choose_heldout(_positions(shuffled), tokens, 0.1, need_tokens=0, max_share=0.5).mask
    assert {shuffled[i] for i in np.flatnonzero(held_shuffled)} == {texts[i] for i in np.flatnonzero(held)}
    other_seed = choose_heldout(_positions(texts, seed=1), tokens, 0.1, need_tokens=0, max_share=0.5).mask
    assert not np.array_equal(other_seed, held)


def test_at_least_one_document_is_held_out():
    texts = [f"teksto {i}" for i in range(10)]
    positions = _positions(texts)
    held = choose_heldout(positions, np.full(10, 5), 0.001, need_tokens=0, max_share=0.5)
    assert held.mask.sum() == 1 and held.mask[np.argmin(positions)]
    assert not choose_heldout(positions[:1], [5], 0.5, need_tokens=0, max_share=0.5).mask.any()


def test_grows_in_position_order_to_the_minimum_tokens():
    texts = [f"teksto {i}" for i in range(100)]
    positions = _positions(texts)
    tokens = np.full(100, 30)
    small = choose_heldout(positions, tokens, 0.01, need_tokens=0, max_share=0.5)
    grown = choose_heldout(positions, tokens, 0.01, need_tokens=256, max_share=0.5)
    assert grown.tokens >= 256 and grown.tokens - 30 < 256  # the fewest documents that reach it
    assert not grown.capped and grown.mask[small.mask].all()
    order = np.argsort(positions)
    assert grown.mask[order[: grown.mask.sum()]].all()  # the smallest positions were added


def test_growth_stops_at_the_share_cap_and_says_so():
    texts = [f"teksto {i}" for i in range(20)]
    held = choose_heldout(_positions(texts), np.full(20, 10), 0.01, need_tokens=1000, max_share=0.2)
    assert held.capped and held.tokens <= 0.2 * 200 and held.tokens == 40
    enough = choose_heldout(_positions(texts), np.full(20, 10), 0.01, need_tokens=30, max_share=0.2)
    assert not enough.capped and enough.tokens == 30


def test_replay_blocks_are_an_even_subset_interleaved_evenly():
    from cpt_kit.data.mix import interleave, select_evenly

    corpus = np.arange(100).reshape(50, 2)  # 50 blocks of 2 ids, arriving in uneven chunks
    replay = -np.arange(1, 61).reshape(30, 2)
    corpus_chunks = [corpus[:7], corpus[7:7], corpus[7:31], corpus[31:]]
    replay_chunks = [replay[:13], replay[13:]]
    chosen = np.concatenate(list(select_evenly(replay_chunks, total=30, wanted=10)))
    assert len(chosen) == 10 and len({tuple(r) for r in chosen}) == 10
    assert chosen[0, 0] == replay[2, 0] and chosen[-1, 0] == replay[29, 0]  # spans the whole replay text
    mixed = np.concatenate(list(interleave(corpus_chunks, 50, [chosen[:4], chosen[4:]], 10, chunk=8)))
    assert len(mixed) == 60
    is_replay = mixed[:, 0] < 0
    assert np.array_equal(mixed[~is_replay], corpus) and np.array_equal(mixed[is_replay], chosen)  # order kept
    gaps = np.diff(np.flatnonzero(is_replay))
    assert gaps.min() >= 5 and gaps.max() <= 7  # one replay block about every 6
