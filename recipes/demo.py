"""Offline demo: teach a tiny English model some Esperanto, then export it for Ollama.

Everything is local: the base model is a tiny Llama built from the shipped English text
(`tiny:` base, SentencePiece tokenizer + a short general pretraining, cached after the first
run), the continued pretraining corpus is the shipped Esperanto text, and part of the English
text is replayed against forgetting. Runs in a few minutes on 2 CPU cores:

    cpt-kit run recipes/demo.py
"""

from pathlib import Path

from cpt_kit.recipe import Data, Eval, Export, Lora, Model, ModelfileSpec, Recipe, Replay, Train

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"

RECIPE = Recipe(
    name="demo",
    model=Model(base=f"tiny:{DATA / 'general'}", max_seq_length=128, load_in_4bit=True),
    lora=Lora(r=16, lora_alpha=32, use_rslora=True, train_embeddings=True),
    data=Data(
        sources=(str(DATA / "esperanto"),),
        split_by="file",  # examples/data holds one short text per file
        heldout_fraction=0.1,
        min_chars=50,
        min_train_blocks=16,
        replay=Replay(sources=(str(DATA / "general"),), fraction=0.2, heldout_fraction=0.1),
    ),
    train=Train(
        learning_rate=2e-3,
        embedding_learning_rate=2e-4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=200,
        warmup_ratio=0.05,
        eval_steps=50,
        save_steps=100,
        gradient_checkpointing=False,
    ),
    eval=Eval(prompts=("La kato", "Hodiaŭ", "En la urbo"), max_new_tokens=24),
    export=Export(
        quantizations=("Q8_0", "Q4_K_M"),
        modelfile=ModelfileSpec(temperature=0.7, top_p=0.9, repeat_penalty=1.1),
    ),
)
