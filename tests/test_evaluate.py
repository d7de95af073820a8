"""Evaluate stage: token-weighted perplexity with token counts and intervals, replay (forgetting) and an
extended vocabulary."""

from __future__ import annotations

import json
import math

import pytest

from stage_helpers import adapter_tensors, run_until


class PerfectOnEven:
    """A fake causal LM: certain of the next token when the current one is even, uniform otherwise."""

    def __new__(cls, vocab: int):
        import torch

        class _LM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def forward(self, input_ids):
                logits = torch.zeros(*input_ids.shape, vocab)
                nxt = (input_ids + 1) % vocab
                sure = (input_ids % 2 == 0)
                logits[sure] = -1e4
                logits[sure.nonzero(as_tuple=True) + (nxt[sure],)] = 0.0
                return type("Out", (), {"logits": logits})()
        return _LM()


def test_perplexity_is_token_weighted_not_mean_of_batches():
    from cpt_kit.perplexity import perplexity

    vocab = 8
    model = PerfectOnEven(vocab)
    sure = [0, 1, 2, 3, 4, 5, 6, 7, 0]          # predictions from 0,2,4,6 exact; from 1,3,5,7 uniform
    unsure = [1, 1, 1]                          # 2 predictions, both uniform
    result = perplexity(model, [sure, unsure], batch_size=1)
    uniform_nll = math.log(vocab)
    expected = (4 * uniform_nll + 2 * uniform_nll) / (8 + 2)
    assert result["tokens"] == 10
    assert result["nll_per_token"] == pytest.approx(expected, rel=1e-4)
    mean_of_means = (4 * uniform_nll / 8 + uniform_nll) / 2
    assert result["nll_per_token"] != pytest.approx(mean_of_means, rel=1e-3)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    # batching does not change the number
    assert perplexity(model, [sure, unsure, sure], batch_size=2)["nll_per_token"] == pytest.approx(
        perplexity(model, [sure, unsure, sure], batch_size=1)["nll_per_token"], rel=1e-6)


@pytest.mark.slow
def test_replay_forgetting_and_extended_vocabulary(tmp_path, tiny_recipe, general_texts, write_corpus):
    from cpt_kit.recipe import Replay, TokenizerExtension

    general = write_corpus(general_texts, "general")
    recipe = tiny_recipe(
        data={"replay": Replay(sources=(str(general),), fraction=0.2, heldout_fraction=0.2),
              "extend_tokenizer": TokenizerExtension(max_new_tokens=16, min_frequency=2, min_subtokens=3)},
        train={"max_steps": 6, "save_steps": 6, "eval_steps": 0})
    root = tmp_path / "run"
    manifest = run_until(recipe, root)
    ev = manifest.metrics("evaluate")
    assert ev["ppl_trained"] < ev["ppl_base"]
    assert math.isfinite(ev["replay_ppl_base"]) and math.isfinite(ev["replay_ppl_trained"])
    report = json.loads((root / "eval" / "perplexity.json").read_text())
    assert set(report["sets"]) == {"heldout", "replay"} and report["weighting"] == "token"
    for scores in report["sets"].values():  # every perplexity with its token count and interval
        for side in ("base", "trained"):
            ppl = scores[side]
            assert ppl["tokens"] == ppl["blocks"] * (recipe.model.max_seq_length - 1)
            assert ppl["ci95"][0] < ppl["perplexity"] < ppl["ci95"][1]
        assert scores["change_pct_ci95"][0] <= scores["change_pct"] <= scores["change_pct_ci95"][1]
        assert scores["significant"] == (scores["change_pct_ci95"][1] < 0 or scores["change_pct_ci95"][0] > 0)
    assert ev["heldout_tokens"] == report["sets"]["heldout"]["base"]["tokens"] and ev["ppl_change_ci95"]
    info = json.loads((root / "adapter" / "cpt_kit_train.json").read_text())
    ext = json.loads((root / "data" / "tokenizer_extension.json").read_text())
    assert ext["added"] and info["tokenizer_extended"] is True
    assert info["vocab_size"] == info["base_vocab_size"] + len(ext["added"])
    tensors = adapter_tensors(root / "adapter")
    assert tensors["base_model.model.model.embed_tokens.weight"].shape[0] == info["vocab_size"]
    assert tensors["base_model.model.lm_head.weight"].shape[0] == info["vocab_size"]
