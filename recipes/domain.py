"""Domain continued pretraining: adapt a small model to a field's vocabulary and facts.

Same language, new domain: a lower LoRA rank than for a new language, embeddings still trained
(domain terms are often split badly and sit in rarely used rows) but with a 10x smaller learning
rate, and a larger replay share of general text, because forgetting general skills is the main
risk of domain CPT. Qwen2.5-0.5B has tied input/output embeddings; they stay tied (one trained
matrix, the base's file size) and the run's summary says so. Point it at your corpus:

    cpt-kit run recipes/domain.py --set data.sources=my_papers/**/*.txt
"""

from cpt_kit.recipe import Data, Eval, Export, Lora, Model, ModelfileSpec, Recipe, Replay, Train

RECIPE = Recipe(
    name="domain",
    model=Model(base="unsloth/Qwen2.5-0.5B", max_seq_length=2048, load_in_4bit=True),
    lora=Lora(r=64, lora_alpha=32, use_rslora=True, train_embeddings=True),
    data=Data(
        sources=("corpus/domain/**/*.txt",),
        heldout_fraction=0.02,
        min_chars=200,
        replay=Replay(sources=("hf:wikimedia/wikipedia:20231101.en",), fraction=0.25, heldout_fraction=0.01),
    ),
    train=Train(
        learning_rate=5e-5,
        embedding_learning_rate=5e-6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        num_train_epochs=2,
        warmup_ratio=0.05,
        eval_steps=100,
        save_steps=200,
    ),
    eval=Eval(prompts=("The most common complication of", "In clinical practice, the first step is"),
              max_new_tokens=64),
    export=Export(
        quantizations=("Q4_K_M", "Q8_0"),
        modelfile=ModelfileSpec(temperature=0.6, top_p=0.9, num_ctx=2048),
    ),
)
