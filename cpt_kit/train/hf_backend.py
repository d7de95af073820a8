"""The hf backend: transformers + PEFT + TRL (+ bitsandbytes 4-bit on CUDA).

Same adapter format as the Unsloth backend: LoRA on the recipe's target modules, embed_tokens
and lm_head as full `modules_to_save` weights (one shared matrix on a tied base), and an
optimizer with the embeddings in their own parameter group at `train.embedding_learning_rate`. The
data is already tokenized (and, for CPT, packed): TRL's dataset preparation is skipped and a block
collator (CPT) or TRL's own language-modeling collator (SFT, labels prepared) feeds the model.
"""

from __future__ import annotations

from typing import Any

from cpt_kit.train.backend import BlockCollator, TrainSetup, embedding_param_groups, trainer_arguments
from cpt_kit.train.embeddings import extend_vocabulary, keeps_tie


class HFBackend:
    name = "hf"

    def load_model(self, setup: TrainSetup) -> tuple[Any, Any]:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = dict(setup.load_kwargs, dtype=setup.torch_dtype)
        if setup.load_in_4bit:
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=setup.torch_dtype)
            kwargs["device_map"] = {"": 0}
        model = AutoModelForCausalLM.from_pretrained(setup.base, **kwargs)
        if setup.device == "cuda" and not setup.load_in_4bit:
            model = model.to("cuda")
        tokenizer = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
        extend_vocabulary(model, setup.extension)
        lora = setup.recipe.lora
        gradient_checkpointing = setup.gradient_checkpointing
        if setup.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, use_rslora=lora.use_rslora,
            target_modules=list(lora.target_modules), modules_to_save=setup.modules_to_save or None,
            # A tied base stays tied: lm_head keeps sharing the trained embed_tokens (cpt_kit.train.embeddings).
            ensure_weight_tying=keeps_tie(model) and bool(setup.modules_to_save),
            bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        return model, tokenizer

    def make_trainer(self, setup: TrainSetup, model: Any, tokenizer: Any, train_dataset: Any,
                     eval_dataset: Any, callbacks: list[Any], data_collator: Any = None) -> Any:
        from transformers import Trainer
        from trl import SFTConfig, SFTTrainer

        t = setup.recipe.train

        class EmbeddingLRTrainer(SFTTrainer):
            """SFTTrainer whose optimizer puts embed_tokens/lm_head in their own group."""

            def create_optimizer(self, model=None):
                if self.optimizer is None:
                    target = self.model if model is None else model
                    optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
                    optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
                    groups = embedding_param_groups(target, t.learning_rate, t.embedding_learning_rate,
                                                    t.weight_decay)
                    self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
                return self.optimizer

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                # The model's own causal-LM loss, as in transformers.Trainer. TRL 1.15's fused LM head
                # needs Triton kernels (CUDA/XPU only) and fails on CPU; its extra metrics are not needed.
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        args = SFTConfig(gradient_checkpointing=False,  # enabled on the model above, once
                         **trainer_arguments(setup))
        trainer = EmbeddingLRTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                     processing_class=tokenizer, data_collator=data_collator or BlockCollator(),
                                     callbacks=callbacks)
        keep_trainable_weights_in_fp32(trainer.model)
        return trainer


def keep_trainable_weights_in_fp32(model: Any) -> None:
    """fp32 master weights for everything that trains, whatever the mixed precision.

    TRL 1.15's SFTTrainer casts the trainable weights of a quantized (QLoRA) model to bf16. With
    fp16 mixed precision (T4: no bf16) the grad scaler then fails on CUDA ("..._unscale_cuda not
    implemented for 'BFloat16'", seen on an H100 with precision=fp16), and with bf16 the full
    embed_tokens/lm_head copies would lose updates at a small embedding learning rate (a 5e-6
    step is below bf16's resolution for most weights). Autocast still computes in 16-bit.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
