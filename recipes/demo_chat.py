"""Offline chat demo: SFT the CPT demo's model on the shipped supportive conversations, export it,
verify it and run the safety probe. The whole of issue 12's chain on 2 CPU cores in a few minutes:

    cpt-kit run recipes/demo.py          # tiny base -> CPT on Esperanto -> runs/demo
    cpt-kit run recipes/demo_chat.py     # runs/demo -> SFT -> GGUF -> Modelfile -> verify -> safety probe

The tiny model (a few million parameters, trained for minutes) cannot give safe answers, and the
safety probe says so: the run ends with "safety probe below the recipe's thresholds" and the model
is not handed to Ollama. That is the gate working. To see the rest of the chain (the report), run
it with the explicit override, which the manifest records:

    cpt-kit run recipes/demo_chat.py --set safety.accept_failure=true

Before the probe, verify requires the fine-tuned model to end its turn by itself (greedy, within twice
the length of a held-out reference answer). Measured on an idle 2-core CPU (hf backend): after 40
steps the tiny model had not learned to stop; after 400 steps (115 s of training, 2 min 15 s for
the whole run) it ends its turn after 7 tokens. Packing is off: on a CPU this tiny model trains
2x slower per token packed (BENCHMARKS.md, chat demo).

eval/comparison.md shows the same prompts answered by the tiny base, the CPT model and the chat
model side by side. The system prompt and the safety rules are mental_health.py's.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mental_health import CHAT, SYSTEM_PROMPT  # noqa: E402

from cpt_kit.recipe import Data, Eval, Export, Lora, Model, ModelfileSpec, Recipe, Safety, Sft, Train  # noqa: E402

RECIPE = Recipe(
    name="demo_chat",
    model=Model(base="runs/demo", max_seq_length=1024, load_in_4bit=True),
    lora=Lora(r=16, lora_alpha=32, use_rslora=True, train_embeddings=True),
    data=Data(sources=(str(CHAT / "*.jsonl"),), heldout_fraction=0.1),
    sft=Sft(system_prompt=SYSTEM_PROMPT),
    train=Train(
        objective="sft",
        learning_rate=2e-3,
        embedding_learning_rate=2e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=400,
        warmup_ratio=0.05,
        eval_steps=100,
        save_steps=100,
        gradient_checkpointing=False,
    ),
    eval=Eval(prompts=("I feel anxious before my exams.", "Mi sentas min soleca."), max_new_tokens=24),
    export=Export(quantizations=("Q8_0",), modelfile=ModelfileSpec(temperature=0.6, top_p=0.9, repeat_penalty=1.1)),
    safety=Safety(languages=("en", "eo"), max_new_tokens=48),
)
