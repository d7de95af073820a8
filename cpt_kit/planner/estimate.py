"""Peak training memory and FLOPs of a LoRA run, from the model's shape alone.

Memory (bytes), by part:
- weights: block linear layers in 4-bit NF4 (0.5 byte + a fp32 absmax per 64 weights, itself
  8-bit with double quantization: ~0.52 byte/param) or 16/32-bit; norms and embeddings stay 16-bit
  (32-bit on CPU) either way;
- trainable embed_tokens/lm_head (PEFT modules_to_save): an fp32 master copy and the optimizer's
  two states (1 byte each for 8-bit AdamW, 4 for torch AdamW; they exist from the first optimizer
  step on), per trained matrix, plus one fp32 gradient (lm_head's, made at the start of backward
  while the activations are alive; embed_tokens' appears at the end of backward, after they are
  freed, and gradients are freed after each step). The frozen originals stay in the weights. A
  tied base trains one matrix (both backends keep the tie, cpt_kit.train.embeddings);
- LoRA A/B: fp32 weights, gradients and optimizer states;
- activations: per token and layer the tensors autograd keeps for a Llama block with LoRA, counted
  with torch.autograd.graph.saved_tensors_hooks on the hf path: 4 of width hidden (both norms'
  inputs and outputs), q and the attention output (q_dim), k and v (kv_dim), 4 of width
  intermediate (gate, up, activation, product), in the compute dtype; the LoRA rank-r
  intermediates are negligible. SDPA (flash kernels on GPU and on CPU, causal, no padding mask)
  keeps only a per-row logsumexp, no [heads, seq, seq] scores. With gradient checkpointing only
  each layer's input plus one layer's working set;
- logits: [batch*seq, vocab] in 16-bit for Unsloth's fused chunked cross-entropy; the hf path
  peaks in the backward of its fp32 cross-entropy, where the saved log-softmax, its incoming
  gradient and the logits' gradient coexist: 12 bytes per logit (measured on CPU), which
  dominates for 128k-262k vocabularies.

Measured on CPU (bench/plan_check.py model, RSS sampled around each phase), the process peaks in
the second step's backward, at the cross-entropy, on top of the runtime (CPU_RUNTIME_GIB), the
weights, the master copies and the optimizer states. Its peak RSS also holds freed blocks glibc's
allocator keeps for reuse ("freed, kept by malloc", CPU only): the step's activations and
logits are freed every step, and glibc's dynamic mmap threshold keeps later ones of that size in
its heap instead of returning them. With blocks of one shape it keeps about half a step's worth
(cpu-32k model: the peak drops from 1,867 to 1,668 MiB with MALLOC_MMAP_THRESHOLD_=65536); with
SFT batches padded to their longest row every step has another shape, the freed pieces do not fit
the next step's tensors and the heap grows by about a whole step's worth (demo chat SFT: 733 MiB
with that threshold, 865 after 6 steps and 935 after 19 by default). CPU_MALLOC_KEPT has both
factors.

FLOPs per trained token: 2 per weight forward; backward 2 per frozen weight (input gradient only)
and 4 per trainable weight (input and weight gradient); gradient checkpointing recomputes the
blocks' forward once more; causal attention adds 2*seq*q_dim per layer forward (x3 with backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpt_kit.planner.shapes import ModelShape

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64 / 4 + 4 / 256 / 64  # 4-bit codes + double-quantized absmax
CUDA_CONTEXT_GIB = 0.6
"""Memory the CUDA context and kernels take outside torch's allocator."""
FRAGMENTATION = 1.10
"""Allocator overhead on top of the peak of live tensors."""
CPU_RUNTIME_GIB = 0.55
"""Resident memory of a CPU training process before the model loads (Python with torch,
transformers, peft, trl and datasets imported: 0.52 GiB measured on this project's CI machine)."""
UTILISATION = {"unsloth": 0.26, "hf": 0.15}
"""Share of the device's peak FLOPS reached in training. Measured on an H100 (BENCHMARKS.md:
Llama-3.2-1B shape, 4-bit, r=128, seq 2048: 30,369 tokens/s Unsloth = 26%, 17,856 hf = 15%) and
used for every GPU; on CPU both backends run plain PyTorch kernels."""
CPU_UTILISATION = 0.6
"""Share of the "cpu" device's peak reached by CPU training (fp32 PyTorch kernels, both backends).
Measured on that 2-core machine, idle, 2026-11-27 (BENCHMARKS.md, planner): 0.48 for the demo CPT
run (2M parameters, 18.2 s), 0.51 for the demo chat SFT run (98.7 s) and 0.70 for a SmolLM-135M
shape (hf, seq 256 x batch 2, 206 tokens/s). 0.6 puts all three within 25% (-20%, -16%, +18%): a
bigger model keeps the vector units busier than a 2M one."""
CPU_MALLOC_KEPT = {False: 0.5, True: 1.0}
"""Freed blocks glibc keeps on CPU, as a share of a step's activations + logits: fixed-shape
batches (False) or batches padded to their longest row, one shape per step (True)."""


@dataclass(frozen=True)
class Settings:
    """What the estimate depends on besides the shape (derived from a recipe and a device)."""

    batch_size: int
    seq_len: int
    r: int
    targets: tuple[str, ...]
    train_embeddings: bool
    load_in_4bit: bool
    gradient_checkpointing: bool
    backend: str
    """unsloth or hf."""
    cuda: bool
    eight_bit_optimizer: bool
    padded_batches: bool = False
    """SFT without packing: each batch is padded to its longest row (at most seq_len), so every
    step has its own shape."""


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, float]
    """Bytes of each part at the peak."""
    flops_per_token: float
    trainable_params: int

    @property
    def peak_bytes(self) -> float:
        return sum(self.parts.values())

    def needed_gib(self, cuda: bool) -> float:
        """What the device must have: peak tensors plus allocator and CUDA context (or, on CPU,
        the process's runtime)."""
        if cuda:
            return self.peak_bytes * FRAGMENTATION / GIB + CUDA_CONTEXT_GIB
        return self.peak_bytes / GIB + CPU_RUNTIME_GIB


def trained_embedding_matrices(shape: ModelShape, s: Settings) -> int:
    if not s.train_embeddings:
        return 0
    return 1 if shape.tied_embeddings else 2


def estimate(shape: ModelShape, s: Settings) -> Estimate:
    weight_bytes = 2 if s.cuda else 4
    act_bytes = 2 if s.cuda else 4
    opt_bytes = 2 if s.eight_bit_optimizer else 8
    tokens = s.batch_size * s.seq_len
    embeddings = shape.embedding_params * (1 if shape.tied_embeddings else 2)
    linear = shape.block_linear_params * (NF4_BYTES_PER_PARAM if s.load_in_4bit else weight_bytes)
    lora = shape.lora_params(s.r, s.targets)
    n_embed = trained_embedding_matrices(shape, s)

    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    layer = tokens * (4 * h + 2 * q_dim + 2 * kv_dim + 4 * i) * act_bytes
    if s.gradient_checkpointing:
        activations = tokens * h * act_bytes * shape.num_layers + layer
    else:
        activations = layer * shape.num_layers
    logit_bytes = (2 if s.cuda else 4) if s.backend == "unsloth" else 12

    parts = {
        "weights": linear + (embeddings + shape.norm_params) * weight_bytes,
        "trainable embeddings": n_embed * shape.embedding_params * (4 + opt_bytes)
                                + min(n_embed, 1) * shape.embedding_params * 4,  # lm_head's gradient
        "lora": lora * (4 + 4 + opt_bytes),
        "activations": activations,
        "logits": tokens * shape.vocab_size * logit_bytes,
    }
    if not s.cuda:
        parts["freed, kept by malloc"] = CPU_MALLOC_KEPT[s.padded_batches] * (parts["activations"] + parts["logits"])
    head = shape.embedding_params
    blocks_fwd = 2 * (shape.block_linear_params + lora) + 2 * s.seq_len * q_dim * shape.num_layers
    flops = (blocks_fwd + 2 * head                                  # forward
             + 2 * shape.block_linear_params + 4 * lora            # backward, blocks
             + 4 * s.seq_len * q_dim * shape.num_layers
             + (4 if s.train_embeddings else 2) * head              # backward, lm_head
             + (blocks_fwd if s.gradient_checkpointing else 0))    # recompute
    return Estimate(parts, float(flops), lora + n_embed * shape.embedding_params)
