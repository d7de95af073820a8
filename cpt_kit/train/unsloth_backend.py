"""The unsloth backend: FastLanguageModel + UnslothTrainer with a separate embedding learning rate.

`import unsloth` must come before transformers/trl/peft are imported (it patches them), so it is
the first import of this module, and only this module imports it: the rest of cpt-kit stays
importable without Unsloth. What Unsloth does with embed_tokens/lm_head (checked in
unsloth/models/_utils.py, 2026.10.9): names in `target_modules` are moved to `modules_to_save`
(full trainable copies, saved whole in the adapter); on a model with tied embeddings it keeps
only embed_tokens there and lets PEFT re-tie lm_head to it (`ensure_weight_tying`, which this
backend also asks for explicitly: a tied base stays tied in both backends, see
cpt_kit.train.embeddings).
UnslothTrainer puts every `*.modules_to_save.default.weight` in a group at
`embedding_learning_rate`.
"""

from __future__ import annotations

import unsloth  # noqa: F401  (first: patches transformers, trl and peft)
from unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments

from typing import Any  # noqa: E402

from cpt_kit.train.backend import BlockCollator, TrainSetup, trainer_arguments  # noqa: E402
from cpt_kit.train.embeddings import extend_vocabulary, keeps_tie  # noqa: E402


class UnslothBackend:
    name = "unsloth"

    def load_model(self, setup: TrainSetup) -> tuple[Any, Any]:
        from transformers import AutoTokenizer

        recipe = setup.recipe
        kw = setup.load_kwargs
        model, _ = FastLanguageModel.from_pretrained(
            model_name=setup.base, max_seq_length=recipe.model.max_seq_length, dtype=setup.torch_dtype,
            load_in_4bit=setup.load_in_4bit, token=kw.get("token"), revision=kw.get("revision"),
            trust_remote_code=kw.get("trust_remote_code", False), random_state=recipe.train.seed)
        tokenizer = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
        extend_vocabulary(model, setup.extension)
        lora = recipe.lora
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=list(lora.target_modules) + setup.modules_to_save, bias="none",
            use_gradient_checkpointing="unsloth" if setup.gradient_checkpointing else False,
            random_state=recipe.train.seed, use_rslora=lora.use_rslora,
            ensure_weight_tying=keeps_tie(model) and bool(setup.modules_to_save),
            max_seq_length=recipe.model.max_seq_length)
        return model, tokenizer

    def make_trainer(self, setup: TrainSetup, model: Any, tokenizer: Any, train_dataset: Any,
                     eval_dataset: Any, callbacks: list[Any], data_collator: Any = None) -> Any:
        t = setup.recipe.train
        embedding_lr = t.embedding_learning_rate if setup.modules_to_save else None
        args = UnslothTrainingArguments(embedding_learning_rate=embedding_lr, **trainer_arguments(setup))
        return UnslothTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              processing_class=tokenizer, data_collator=data_collator or BlockCollator(),
                              callbacks=callbacks)
