"""The recipe schema: frozen, typed dataclasses with one docstring per field (LitGPT style).

Field names follow TRL / transformers / PEFT where the mapping is one-to-one. A `Recipe` is
validated when it is constructed (`cpt_kit.recipe.validate`), so a bad recipe fails before any
model is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

QUANT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
               "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Model:
    base: str
    """Base model: a Hugging Face hub id, a local model directory, or a finished run directory."""
    tokenizer: Optional[str] = None
    """Tokenizer to use if not the base model's own (hub id or local directory)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    load_in_4bit: bool = True
    """Load the base in 4-bit (bitsandbytes NF4) for training. CUDA only: on CPU cpt-kit loads 16/32-bit and says so."""
    max_seq_length: int = 2048
    """Length of the packed training blocks and the model's training context."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Weight dtype of the non-quantized parts; auto picks bf16 where supported, else fp16 (fp32 on CPU)."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless you trust the repository."""
    hf_token_env: str = "HF_TOKEN"
    """Name of the environment variable holding a hub token (the token itself never goes in a recipe)."""


@dataclass(frozen=True)
class Lora:
    r: int = 128
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    use_rslora: bool = True
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Linear layers that get LoRA adapters (all linear layers of a Llama-style block by default)."""
    train_embeddings: bool = True
    """Also train embed_tokens and lm_head as full modules (needed to learn a new language)."""


@dataclass(frozen=True)
class Replay:
    sources: tuple[str, ...]
    """General text mixed in against forgetting: files, directories, globs, JSONL/Parquet or hf:NAME."""
    fraction: float = 0.1
    """Share of the training tokens that come from the replay text."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/dataset rows."""
    heldout_fraction: float = 0.05
    """Share of replay documents kept out of training to measure forgetting."""


@dataclass(frozen=True)
class TokenizerExtension:
    max_new_tokens: int = 256
    """Add at most this many new tokens."""
    min_frequency: int = 5
    """A candidate piece must occur at least this often in the corpus."""
    min_subtokens: int = 3
    """Only pieces the current tokenizer splits into at least this many tokens are candidates."""


@dataclass(frozen=True)
class Data:
    sources: tuple[str, ...] = ()
    """Corpus: text files, directories, globs, .jsonl/.parquet files, local dataset dirs or hf:NAME[:CONFIG]."""
    split_by: str = "paragraph"
    """How text files split into documents: paragraph (blank lines; default: most raw corpora are one big file, and paragraphs keep poems/code/tables whole), file (one per file: for one-document-per-file folders), line, or a regex matching whole separator lines (e.g. "%", "</?doc[^>]*>")."""
    long_document_chars: int = 100_000
    """Documents longer than this are cut into pieces of at most this many characters, at the last paragraph break, else line break, else space (hard cut only without whitespace); stats.json counts the cuts."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/dataset rows."""
    hf_split: str = "train"
    """Split of a Hugging Face dataset source."""
    streaming: bool = False
    """Stream Hugging Face datasets instead of downloading them whole (replay sources always stream)."""
    max_documents: Optional[int] = None
    """Stop reading after this many documents per source (useful with streaming)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes: strict stops with the file and byte offset; replace substitutes U+FFFD."""
    collapse_whitespace: bool = False
    """Also collapse runs of spaces and strip every line's indentation (off: code, poetry and tables keep their layout; only trailing whitespace and runs of blank lines are normalised)."""
    min_chars: int = 20
    """Drop documents shorter than this after cleaning."""
    max_chars: Optional[int] = None
    """Drop documents longer than this after cleaning (None: no limit)."""
    dedup_exact: bool = True
    """Drop exact duplicate documents."""
    dedup_near: bool = True
    """Drop near-duplicate documents (MinHash LSH)."""
    near_dup_threshold: float = 0.85
    """Estimated Jaccard similarity above which two documents are near duplicates."""
    heldout_fraction: float = 0.02
    """Share of documents held out for evaluation (split by document, deterministic)."""
    heldout_min_blocks: int = 16
    """The held-out set grows (more documents, deterministic order) to at least this many blocks, so its perplexities are not noise."""
    heldout_min_tokens: int = 8192
    """...and to at least this many tokens (a standard error of a few percent on a perplexity, not tens as on a few hundred tokens)."""
    heldout_max_share: float = 0.1
    """The held-out growth stops at this share of the corpus tokens; prepare warns when the minimum is then not reached."""
    min_train_blocks: int = 8
    """Fewest packed training blocks accepted; a smaller corpus is an error, not a 0-step run."""
    seed: int = 0
    """Seed of the held-out split and mixing."""
    num_proc: int = 2
    """Batches tokenized at once, in threads (the Rust tokenizer releases the GIL)."""
    replay: Optional[Replay] = None
    """General text mixed into training against catastrophic forgetting."""
    extend_tokenizer: Optional[TokenizerExtension] = None
    """Add frequent, badly split corpus pieces to the vocabulary (new-language CPT)."""


@dataclass(frozen=True)
class Sft:
    """Chat data and template for train.objective="sft" (the corpus location stays in `data`)."""

    format: Literal["auto", "messages", "sharegpt", "qa"] = "auto"
    """Row layout: messages (role/content list), sharegpt (from/value list), qa (question/answer columns), auto (per row)."""
    messages_field: str = "messages"
    """Field holding a list of {"role", "content"} messages."""
    conversations_field: str = "conversations"
    """Field holding a ShareGPT list of {"from", "value"} turns (human/gpt/system are mapped to user/assistant/system)."""
    question_field: str = "question"
    """Field holding the question of a question/answer row (becomes the user turn)."""
    answer_field: str = "answer"
    """Field holding the answer of a question/answer row (becomes the assistant turn)."""
    system_prompt: Optional[str] = None
    """System message put first in every conversation that has none (also the Modelfile's SYSTEM unless export.modelfile.system is set)."""
    chat_template: str = "auto"
    """auto (the tokenizer's own template, else ChatML), a family of cpt_kit.export.chat_families (chatml, llama3, llama31, gemma, phi3, phi4, mistral) or the plain-text prompt format qa (### Question:/### Answer:)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Conversations over model.max_seq_length: truncate at a turn boundary (at least one full assistant turn kept) or drop."""
    invalid: Literal["error", "drop"] = "error"
    """A malformed conversation (unknown role, empty content, ...): stop with its file:line, or drop it and count the reason."""


@dataclass(frozen=True)
class Train:
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """Training library: unsloth, hf (transformers+PEFT+TRL), or auto: unsloth on a GPU when it is
    installed, else hf (on CPU hf is the faster of the two, see BENCHMARKS.md)."""
    objective: Literal["cpt", "sft"] = "cpt"
    """Training objective: cpt (causal LM on packed raw text) or sft (chat data, loss on assistant turns only; see `sft`)."""
    packing: bool = False
    """sft: pack several conversations per row without cross-attention (padding-free, position ids restart per conversation)."""
    learning_rate: float = 5e-5
    """Learning rate of the LoRA adapters."""
    embedding_learning_rate: Optional[float] = 5e-6
    """Learning rate of embed_tokens/lm_head (usually 2-10x smaller); needs lora.train_embeddings."""
    per_device_train_batch_size: int = 2
    """Blocks per device per step."""
    gradient_accumulation_steps: int = 8
    """Steps accumulated per optimizer update."""
    num_train_epochs: float = 1.0
    """Passes over the training blocks (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use num_train_epochs)."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming up the learning rate."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    optim: str = "auto"
    """Optimizer name as in transformers (auto: adamw_8bit on CUDA, adamw_torch_fused on CPU)."""
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Mixed precision: auto picks bf16 where supported, else fp16 on GPU, fp32 on CPU."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute activations in the backward pass to save memory; auto: on with a GPU, off on CPU
    (memory is rarely the limit there and it costs 25-50% more time per step: BENCHMARKS.md)."""
    logging_steps: int = 1
    """Log loss, lr, tokens/s and memory every N steps to logs/train.jsonl."""
    eval_steps: int = 50
    """Evaluate held-out loss every N steps (0: only at the end)."""
    save_steps: int = 100
    """Save a resumable checkpoint every N steps."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    seed: int = 3407
    """Training seed."""


@dataclass(frozen=True)
class Eval:
    prompts: tuple[str, ...] = ()
    """Fixed prompts generated from before and after training."""
    max_new_tokens: int = 48
    """Tokens generated per prompt (greedy)."""
    max_blocks: Optional[int] = 256
    """Evaluate perplexity on at most this many held-out blocks (None: all)."""


@dataclass(frozen=True)
class ModelfileSpec:
    template: str = "auto"
    """Chat template: auto (from the tokenizer's own template), none (plain completion), a family name from modelfiles/, or a file path."""
    system: Optional[str] = None
    """SYSTEM prompt written into the Modelfile."""
    temperature: Optional[float] = None
    """Sampling temperature (PARAMETER temperature)."""
    top_p: Optional[float] = None
    """Nucleus sampling (PARAMETER top_p)."""
    top_k: Optional[int] = None
    """Top-k sampling (PARAMETER top_k)."""
    repeat_penalty: Optional[float] = None
    """Repetition penalty (PARAMETER repeat_penalty)."""
    num_ctx: Optional[int] = None
    """Context window Ollama allocates (default: model.max_seq_length)."""
    extra_stops: tuple[str, ...] = ()
    """Stop strings added to those found in the tokenizer."""


@dataclass(frozen=True)
class Export:
    outtype: Literal["f16", "bf16"] = "f16"
    """Type of the unquantized GGUF the quantizations start from."""
    quantizations: tuple[str, ...] = ("Q4_K_M", "Q8_0")
    """llama.cpp quantization types to produce."""
    modelfile_quant: Optional[str] = None
    """Which GGUF the Modelfile's FROM points to (default: the first quantization)."""
    modelfile: ModelfileSpec = field(default_factory=ModelfileSpec)
    """Ollama Modelfile settings."""
    adapter_modelfile: bool = False
    """Also write a LoRA-adapter GGUF and a Modelfile with ADAPTER over the base GGUF."""
    max_f16_ppl_delta: float = 0.01
    """Verification fails if the F16 GGUF's perplexity differs from the HF model's by more than this share."""
    quant_max_ppl_delta: tuple[str, ...] = ()
    """Per-quantization limit on the perplexity increase over the F16 GGUF, as "QUANT=share" items
    (e.g. ("Q4_K_M=0.3",); "Q4_K_M=none" turns it off). Unlisted quantizations use the measured
    defaults (cpt_kit/export/quant_gate.py, README): Q8_0 0.02, Q6_K 0.05, Q5_K_M 0.08, Q4_K_M 0.15.
    A quantization over its limit fails verify, and the Modelfile is pointed at one that passed."""
    quant_max_kl: tuple[str, ...] = ()
    """Per-quantization limit on the mean KL divergence (nats/token) of the next-token distributions from
    the F16 GGUF's, as "QUANT=value" items; defaults: Q8_0 0.01, Q6_K 0.03, Q5_K_M 0.06, Q4_K_M 0.12."""
    token_embedding_type: Optional[Literal["Q8_0", "F16"]] = "Q8_0"
    """Type of token_embd.weight in every quantization (llama.cpp's token_embedding_type; None: llama.cpp's
    choice for the quantization). Q8_0 keeps a new language's embeddings intact for ~1 bit/weight more."""
    output_tensor_type: Optional[Literal["Q8_0", "F16"]] = "Q8_0"
    """Type of output.weight (lm_head) in every quantization (llama.cpp's output_tensor_type; None:
    llama.cpp's choice). Ignored when the output is tied to token_embd."""
    imatrix: bool = True
    """Quantize types below 6 bits with an importance matrix computed from the run's own training text
    (llama.cpp's llama-imatrix, built from the llama-cpp-python source on first use and cached)."""
    imatrix_tokens: int = 32768
    """Training tokens the importance matrix is computed on (in chunks of up to 512)."""


@dataclass(frozen=True)
class Safety:
    probe_set: str = "mental_health"
    """Probe prompts and their rules: a shipped set (mental_health) or a JSON file (format: cpt_kit/safety/probes.py)."""
    languages: tuple[str, ...] = ("en",)
    """Languages to probe: those the recipe trains for (each needs prompts and rule patterns in the probe set)."""
    categories: tuple[str, ...] = ()
    """Probe only these categories of the set (empty: all)."""
    formats: tuple[str, ...] = ("hf", "gguf")
    """Models to probe: hf (the merged model) and/or gguf (the Modelfile's GGUF, prompted as Ollama does)."""
    min_pass_rate: float = 0.9
    """The run fails when a format's share of probes that pass every rule is below this."""
    min_category_pass_rate: float = 0.6
    """... or when any category's share is below this."""
    accept_failure: bool = False
    """Finish and publish even when the probe fails: an explicit override, recorded in the manifest."""
    max_new_tokens: int = 160
    """Tokens generated per answer (greedy)."""
    judge_gguf: Optional[str] = None
    """A local GGUF (e.g. a guard model) that also scores each answer SAFE/UNSAFE; reported, the rules decide."""


@dataclass(frozen=True)
class Recipe:
    name: str
    """Run name: outputs go to runs/<name>/."""
    model: Model
    """Base model and how to load it."""
    lora: Lora = field(default_factory=Lora)
    """LoRA adapter settings."""
    data: Data = field(default_factory=Data)
    """Corpus and its preparation."""
    train: Train = field(default_factory=Train)
    """Training settings."""
    sft: Sft = field(default_factory=Sft)
    """Chat data and template (used when train.objective="sft")."""
    eval: Eval = field(default_factory=Eval)
    """Evaluation settings."""
    export: Export = field(default_factory=Export)
    """Merge, GGUF, quantization, Modelfile and verification settings."""
    safety: Optional[Safety] = None
    """Safety probe of a chat model after export (None: no probe; chat recipes should set it)."""

    def __post_init__(self) -> None:
        from cpt_kit.recipe.validate import validate_recipe
        validate_recipe(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists), as stored in manifest.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a recipe dataclass (for `cpt-kit show --docs`)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs
