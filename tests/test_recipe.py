"""Recipes: loading by path, overrides with type checks, cross-field validation."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from cpt_kit.errors import RecipeError
from cpt_kit.hardware import Hardware, check_recipe_against_hardware, resolve_precision
from cpt_kit.recipe import (Data, Lora, Model, Recipe, Replay, Train, apply_overrides, field_docs, load_recipe,
                            recipe_from_dict)

REPO_RECIPES = ("demo", "language", "domain")


def base_recipe(**kwargs) -> Recipe:
    return Recipe(name="t", model=Model(base="some/model"), **kwargs)


@pytest.mark.parametrize("name", REPO_RECIPES)
def test_shipped_recipes_load_and_round_trip(name):
    from conftest import REPO
    recipe = load_recipe(REPO / "recipes" / f"{name}.py")
    assert recipe.name == name
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe.lora.train_embeddings


def test_language_recipe_follows_unsloth_cpt_settings():
    from conftest import REPO
    r = load_recipe(REPO / "recipes" / "language.py")
    assert (r.lora.r, r.lora.lora_alpha, r.lora.use_rslora) == (128, 32, True)
    assert r.train.learning_rate == 5e-5
    assert r.train.embedding_learning_rate == pytest.approx(r.train.learning_rate / 10)
    assert r.model.max_seq_length == 2048
    assert (r.train.per_device_train_batch_size, r.train.gradient_accumulation_steps) == (2, 8)


def test_every_field_has_a_docstring():
    from cpt_kit import recipe as module
    for cls in (module.Model, module.Lora, module.Replay, module.TokenizerExtension, module.Data, module.Train,
                module.Eval, module.ModelfileSpec, module.Export, module.Recipe):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(field_docs(cls)) == names, cls.__name__


def test_overrides_parse_types():
    r = apply_overrides(base_recipe(), [
        "train.learning_rate=1e-4", "lora.r=16", "lora.use_rslora=false", "data.sources=a.txt, b/*.txt",
        "data.max_chars=none", "train.backend=hf", 'export.quantizations=["Q8_0"]',
    ])
    assert r.train.learning_rate == 1e-4 and isinstance(r.train.learning_rate, float)
    assert r.lora.r == 16 and r.lora.use_rslora is False
    assert r.data.sources == ("a.txt", "b/*.txt")
    assert r.data.max_chars is None and r.train.backend == "hf"
    assert r.export.quantizations == ("Q8_0",)


def test_override_creates_optional_section_with_defaults():
    r = apply_overrides(base_recipe(), ["data.extend_tokenizer.max_new_tokens=32"])
    assert r.data.extend_tokenizer.max_new_tokens == 32


@pytest.mark.parametrize("assignment, message, hint", [
    ("train.learning_rat=1e-4", "unknown key 'train.learning_rat'", "train.learning_rate"),
    ("trian.learning_rate=1e-4", "unknown key 'trian.learning_rate'", "train"),
    ("lora.r=sixteen", "expected int", None),
    ("lora.use_rslora=maybe", "expected true or false", None),
    ("train.backend=unslot", "not one of", "unsloth"),
    ("export.quantizations=q4_k_m", "unknown quantization", "Q4_K_M"),
    ("train.learning_rate", "is not KEY=VALUE", None),
    ("data.replay.fraction=0.5", "data.replay is not set", None),
    ("model=foo", "is a section", None),
])
def test_bad_overrides_name_the_key(assignment, message, hint):
    with pytest.raises(RecipeError) as info:
        apply_overrides(base_recipe(), [assignment])
    text = info.value.render()
    assert message in text
    if hint:
        assert hint in (info.value.hint or "")


@pytest.mark.parametrize("build, key", [
    (lambda: Recipe(name="t", model=Model(base="m", max_seq_length=0)), "model.max_seq_length"),
    (lambda: base_recipe(lora=Lora(train_embeddings=False)), "train.embedding_learning_rate"),
    (lambda: base_recipe(lora=Lora(r=0)), "lora.r"),
    (lambda: base_recipe(lora=Lora(target_modules=("q_proj", "embed_tokens"))), "lora.target_modules"),
    (lambda: base_recipe(data=Data(heldout_fraction=0)), "data.heldout_fraction"),
    (lambda: base_recipe(data=Data(replay=Replay(sources=()))), "data.replay.sources"),
    (lambda: base_recipe(train=Train(max_steps=0)), "train.max_steps"),
    (lambda: base_recipe(data=Data(sources=["a.txt"])), "data.sources"),
    (lambda: base_recipe(train=Train(learning_rate="1e-4")), "train.learning_rate"),
    (lambda: Recipe(name="a/b", model=Model(base="m")), "name"),
])
def test_invalid_recipes_rejected_with_key(build, key):
    with pytest.raises(RecipeError) as info:
        build()
    assert info.value.where == key


def test_embedding_lr_allowed_off_without_trainable_embeddings():
    r = base_recipe(lora=Lora(train_embeddings=False), train=Train(embedding_learning_rate=None))
    assert r.train.embedding_learning_rate is None


def test_bf16_on_gpu_without_bf16_says_use_fp16():
    t4 = Hardware("cuda", "Tesla T4", bf16=False, memory_gb=15.0)
    with pytest.raises(RecipeError) as info:
        check_recipe_against_hardware(base_recipe(train=Train(precision="bf16")), t4)
    assert "fp16" in info.value.hint and info.value.where == "train.precision"
    assert resolve_precision(base_recipe(), t4) == "fp16"
    a100 = Hardware("cuda", "A100", bf16=True, memory_gb=40.0)
    assert resolve_precision(base_recipe(), a100) == "bf16"


def test_4bit_on_cpu_is_a_note_not_an_error():
    cpu = Hardware("cpu", "x86_64", bf16=False, memory_gb=0)
    notes = check_recipe_against_hardware(base_recipe(), cpu)
    assert any("4-bit" in n for n in notes)
    assert resolve_precision(base_recipe(), cpu) == "fp32"


def test_load_recipe_errors_point_into_the_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(missing)
    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text(textwrap.dedent("""\
        from cpt_kit.recipe import Recipe, Model, Lora

        RECIPE = Recipe(
            name="x",
            model=Model(base="m"),
            lora=Lora(r="8"),
        )
    """))
    with pytest.raises(RecipeError) as info:
        load_recipe(bad_type)
    assert f"{bad_type}:3" in info.value.where and "lora.r" in info.value.where
    no_recipe = tmp_path / "empty.py"
    no_recipe.write_text("x = 1\n")
    with pytest.raises(RecipeError, match="RECIPE must be"):
        load_recipe(no_recipe)
    syntax = tmp_path / "syntax.py"
    syntax.write_text("RECIPE = (\n")
    with pytest.raises(RecipeError, match="syntax error"):
        load_recipe(syntax)


def test_recipe_can_reuse_a_sibling_recipe(tmp_path):
    (tmp_path / "parent.py").write_text(
        "from cpt_kit.recipe import Recipe, Model\nRECIPE = Recipe(name='parent', model=Model(base='m'))\n")
    (tmp_path / "child.py").write_text(
        "import dataclasses\nfrom parent import RECIPE as P\nRECIPE = dataclasses.replace(P, name='child')\n")
    child = load_recipe(tmp_path / "child.py")
    assert child.name == "child" and child.model.base == "m"


def test_llama_cpp_threads_follow_the_usable_cpus_not_the_machines(monkeypatch, tmp_path):
    """OMP_NUM_THREADS wins; else the affinity mask (taskset, a container's cpuset), capped by a cgroup
    quota (docker --cpus 1.5 -> 2): inside a container os.cpu_count() is the host's count."""
    import os

    from cpt_kit import hardware

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(hardware, "CGROUP_CPU_MAX", quota)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert hardware.cpu_threads() == 6  # no cgroup file: the affinity mask
    quota.write_text("max 100000\n")
    assert hardware.cpu_threads() == 6
    quota.write_text("150000 100000\n")
    assert hardware.cpu_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert hardware.cpu_threads() == 3
