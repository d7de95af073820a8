"""Greedy answers to the probes from the trained HF model and from the exported GGUF.

The GGUF gets the prompt Ollama would build from the run's Modelfile: its SYSTEM as a system
message before the user's message, rendered with the chat template, no BOS in the text (the
runner adds it when the GGUF says so), special tokens parsed, generation stopped on the
end-of-generation tokens and every `PARAMETER stop` string. Decoding is greedy (not the
Modelfile's sampling settings) so the result is reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def ollama_prompt(tokenizer, system: Optional[str], user: str) -> str:
    """The prompt Ollama builds for one user message with Modelfile SYSTEM `system`, as the runner
    receives it (cpt_kit.export.chat_template.expected_prompt: the chat template's rendering, no BOS
    the tokenizer adds itself; verify checks that the Modelfile's TEMPLATE renders the same text)."""
    from cpt_kit.errors import RecipeError
    from cpt_kit.export.chat_template import expected_prompt

    text = expected_prompt(tokenizer, [{"role": "user", "content": user}], system)
    if text is None:
        raise RecipeError("the chat template rejects a conversation of " + ("a system and " if system else "")
                          + "a user message", where="safety",
                          hint="check the model's chat template (and the Modelfile's SYSTEM)")
    return text


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()


def load_model(model_dir: Path):
    """A model for greedy generation: bf16 on a GPU that has it, else fp32; eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def hf_answers(model_dir: Path, tokenizer, prompts: list[str], stops: Sequence[str], max_new_tokens: int,
               batch_size: int = 8) -> list[str]:
    """Greedy answers of the HF model (left-padded batches), cut at the first stop string."""
    import torch

    model = load_model(model_dir)
    device = model.device
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(s) for s in stops
                       if s in tokenizer.get_vocab()} | ({tokenizer.eos_token_id} - {None}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        width = max(map(len, rows))  # left padding: every prompt ends where generation starts
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, eos_token_id=stop_ids, pad_token_id=pad_id)
        answers += [cut_at_stops(tokenizer.decode(row, skip_special_tokens=True), stops) for row in out[:, width:]]
    del model
    return answers


def gguf_answers(gguf: Path, prompts: list[str], stops: Sequence[str], max_new_tokens: int, n_ctx: int,
                 n_threads: Optional[int] = None) -> list[dict]:
    """Greedy answers of the GGUF through llama.cpp in a context of `n_ctx` tokens (the Modelfile's
    num_ctx, what Ollama allocates): {"answer", "finish_reason", "tokens"} per prompt."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    from cpt_kit.export.verify import gguf_add_bos

    with suppress_stdout_stderr(disable=False):  # context-size notes llama.cpp prints even with verbose=False
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    add_bos = gguf_add_bos(llm)
    results = []
    for text in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        llm.reset()
        done = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                     repeat_penalty=1.0, stop=[s for s in stops if s] or None)
        choice = done["choices"][0]
        results.append({"answer": cut_at_stops(choice["text"], stops), "finish_reason": choice["finish_reason"],
                        "tokens": done["usage"]["completion_tokens"]})
    del llm
    return results
