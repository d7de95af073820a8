"""The shared log-prob / perplexity module: chunked scores equal full-logit cross-entropy (plain, PEFT,
soft-capped and non-standard heads), HF and GGUF chunks line up, and intervals say when a change is noise."""

from __future__ import annotations

import math

import numpy as np
import pytest


def _tiny_llama(vocab=300, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


def _full_nll(model, blocks):
    """Reference: the model's own full logits, one cross-entropy over every predicted token."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(blocks)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def _blocks(n, length, vocab, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, length)).tolist()


@pytest.mark.parametrize("chunk_tokens,batch_size", [(7, 4), (None, 2), (64, 1)])
def test_chunked_nll_equals_full_logits(chunk_tokens, batch_size):
    from cpt_kit.perplexity import hf_scores

    model, blocks = _tiny_llama(), _blocks(5, 40, 300)
    scores = hf_scores(model, blocks, batch_size=batch_size, chunk_tokens=chunk_tokens)
    assert scores.total_tokens == 5 * 39 and len(scores.tokens) == 5
    assert scores.nll.sum() == pytest.approx(_full_nll(model, blocks), rel=1e-5)


def test_peft_model_is_scored_with_its_adapter():
    import torch
    from peft import LoraConfig, get_peft_model

    from cpt_kit.perplexity import hf_scores

    blocks = _blocks(3, 33, 300)
    base_nll = hf_scores(_tiny_llama(), blocks).nll.sum()
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                                     init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    nll = hf_scores(model, blocks, chunk_tokens=10).nll.sum()
    assert nll == pytest.approx(_full_nll(model, blocks), rel=1e-5)
    assert abs(nll - base_nll) > 1.0  # the adapter (LoRA and the trained lm_head) was applied


def test_soft_capped_head_is_applied():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from cpt_kit.perplexity import hf_scores

    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                               final_logit_softcapping=2.0)).eval()
    blocks = _blocks(2, 30, 300)
    assert hf_scores(model, blocks, chunk_tokens=8).nll.sum() == pytest.approx(_full_nll(model, blocks), rel=1e-5)


def test_model_whose_logits_are_not_body_plus_head_is_scored_with_its_own_forward():
    from transformers import LlamaForCausalLM

    from cpt_kit.logprobs import _head, _head_matches_model
    from cpt_kit.perplexity import hf_scores

    class ScaledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    plain = _tiny_llama()
    model = ScaledLogits(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    blocks = _blocks(3, 25, 300)
    import torch
    assert not _head_matches_model(model, *_head(model), torch.tensor(blocks))
    assert hf_scores(model, blocks, chunk_tokens=6).nll.sum() == pytest.approx(_full_nll(model, blocks), rel=1e-5)


def test_rows_are_log_softmax_and_chunks_cover_every_position():
    from cpt_kit.logprobs import hf_chunks

    model, blocks = _tiny_llama(), _blocks(2, 21, 300)
    chunks = list(hf_chunks(model, blocks, chunk_tokens=8, rows=True))
    assert [(c.block, c.start, len(c.targets)) for c in chunks] == [(0, 0, 8), (0, 8, 8), (0, 16, 4),
                                                                    (1, 0, 8), (1, 8, 8), (1, 16, 4)]
    for c in chunks:
        assert c.logprobs.dtype == np.float32 and c.logprobs.shape == (len(c.targets), 300)
        np.testing.assert_allclose(np.log(np.exp(c.logprobs.astype(np.float64)).sum(1)), 0.0, atol=1e-5)
        np.testing.assert_allclose(c.logprobs[np.arange(len(c.targets)), c.targets], c.target_logprobs, atol=1e-6)
        assert list(c.targets) == blocks[c.block][c.start + 1:c.start + 1 + len(c.targets)]


def test_iterating_chunks_leaves_grad_mode_and_training_mode_to_the_caller():
    import torch

    from cpt_kit.logprobs import hf_chunks

    model = _tiny_llama().train()
    chunks = hf_chunks(model, _blocks(2, 20, 300), chunk_tokens=8)
    next(chunks)
    assert torch.is_grad_enabled()  # the caller's code between chunks runs with its own grad mode
    list(chunks)
    assert model.training


def test_perplexity_interval_and_token_count():
    from cpt_kit.perplexity import BlockScores

    rng = np.random.default_rng(0)
    nll = rng.normal(4.0, 0.5, size=64) * 255
    report = BlockScores(nll, np.full(64, 255)).report()
    low, high = report["ci95"]
    assert report["tokens"] == 64 * 255 and report["blocks"] == 64
    assert low < report["perplexity"] < high
    wide = BlockScores(nll[:8], np.full(8, 255)).report()["ci95"]
    assert (wide[1] - wide[0]) > (high - low)  # fewer blocks, wider interval
    one = BlockScores(nll[:1], np.array([255])).report()
    assert one["ci95"] is None and one["tokens"] == 255


def test_a_two_percent_change_on_one_block_is_not_called_real():
    from cpt_kit.perplexity import BlockScores, paired_change

    before = BlockScores(np.array([255 * 5.0]), np.array([255]))
    after = BlockScores(np.array([255 * (5.0 + math.log(0.98))]), np.array([255]))
    change = paired_change(before, after)
    assert change["change_pct"] == pytest.approx(-2.0, abs=1e-9)
    assert change["ci95"] is None and change["significant"] is None


def test_paired_change_separates_consistent_gains_from_noise():
    from cpt_kit.perplexity import BlockScores, paired_change

    rng = np.random.default_rng(1)
    tokens = np.full(40, 200)
    before = BlockScores(rng.normal(5.0, 1.0, 40) * 200, tokens)  # blocks differ a lot in difficulty
    consistent = BlockScores(before.nll + 200 * math.log(0.98), tokens)  # 2% better on every block
    swing = np.where(np.arange(40) % 2 == 0, 0.2, -0.2)
    noisy = BlockScores(before.nll + 200 * (math.log(0.98) + swing), tokens)  # 2% on average, +-20% per block
    gain = paired_change(before, consistent)
    assert gain["change_pct"] == pytest.approx(-2.0, abs=1e-6) and gain["significant"] is True
    assert gain["ci95"][1] < 0
    noise = paired_change(before, noisy)
    assert noise["significant"] is False and noise["ci95"][0] < 0 < noise["ci95"][1]
    same = paired_change(before, before)
    assert same["change_pct"] == 0 and same["significant"] is False
    with pytest.raises(ValueError, match="same blocks"):
        paired_change(before, BlockScores(before.nll[:3], tokens[:3]))


@pytest.fixture(scope="module")
def tiny_f16(tiny_base, tmp_path_factory):
    from cpt_kit.export.gguf import convert_to_gguf

    out = tmp_path_factory.mktemp("ppl") / "tiny-F16.gguf"
    convert_to_gguf(tiny_base, out, "f16")
    return out


@pytest.mark.slow
def test_gguf_chunks_line_up_with_hf_chunks(tiny_base, tiny_f16):
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_kit.logprobs import gguf_chunks, hf_chunks
    from cpt_kit.perplexity import gguf_scores, hf_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    blocks = _blocks(3, 50, model.config.vocab_size, seed=3)
    pairs = list(zip(hf_chunks(model, blocks, chunk_tokens=16, rows=True),
                     gguf_chunks(tiny_f16, blocks, chunk_tokens=16, rows=True)))
    assert len(pairs) == 3 * 4
    for hf, gg in pairs:
        assert (hf.block, hf.start) == (gg.block, gg.start)
        np.testing.assert_array_equal(hf.targets, gg.targets)
        assert gg.logprobs.dtype == np.float32 and gg.logprobs.shape == hf.logprobs.shape
        np.testing.assert_allclose(gg.target_logprobs, gg.logprobs[np.arange(len(gg.targets)), gg.targets], atol=1e-5)
        p = np.exp(hf.logprobs.astype(np.float64))
        kl = (p * (hf.logprobs - gg.logprobs)).sum(1)  # what a KL-divergence gate computes per chunk
        assert kl.max() < 1e-3, kl.max()
    hf_ppl, gg_ppl = hf_scores(model, blocks).perplexity, gguf_scores(tiny_f16, blocks).perplexity
    assert gg_ppl == pytest.approx(hf_ppl, rel=2e-3)
