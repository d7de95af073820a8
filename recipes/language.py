"""New-language continued pretraining (the seeds' main example), in the spirit of Unsloth's CPT notebook.

LoRA r=128 / alpha=32 with rsLoRA on all linear layers, plus embed_tokens and lm_head trained as
full modules with a 10x smaller learning rate (the new language needs new input/output
embeddings; a full-size LR on them destabilises training). Packed 2048-token blocks, batch 2 x
accumulation 8. Replayed English Wikipedia keeps the model from forgetting what it knew, and its
held-out perplexity measures how much it did. The default corpus is Esperanto Wikipedia
(streamed); point it at your own text with

    cpt-kit run recipes/language.py --set data.sources=corpus/*.txt

On a Colab T4 (16 GB, no bf16) the 1B model in 4-bit fits with this batch; cpt-kit picks fp16 there.
"""

from cpt_kit.recipe import Data, Eval, Export, Lora, Model, ModelfileSpec, Recipe, Replay, Train

RECIPE = Recipe(
    name="language",
    model=Model(base="unsloth/Llama-3.2-1B", max_seq_length=2048, load_in_4bit=True),
    lora=Lora(r=128, lora_alpha=32, use_rslora=True, train_embeddings=True),
    data=Data(
        sources=("hf:wikimedia/wikipedia:20231101.eo",),
        streaming=True,
        max_documents=100_000,
        heldout_fraction=0.01,
        min_chars=200,
        replay=Replay(sources=("hf:wikimedia/wikipedia:20231101.en",), fraction=0.1, heldout_fraction=0.01),
    ),
    train=Train(
        learning_rate=5e-5,
        embedding_learning_rate=5e-6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        num_train_epochs=1,
        warmup_ratio=0.1,
        lr_scheduler_type="cosine",
        eval_steps=200,
        save_steps=200,
    ),
    eval=Eval(prompts=("La historio de Esperanto", "Hodiaŭ la vetero estas", "La ĉefurbo de Francio estas"),
              max_new_tokens=64),
    export=Export(
        quantizations=("Q4_K_M", "Q5_K_M", "Q8_0"),
        modelfile=ModelfileSpec(temperature=0.7, top_p=0.9, repeat_penalty=1.1, num_ctx=2048),
    ),
)
