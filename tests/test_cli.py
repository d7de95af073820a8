"""The command line, through click's runner (and one subprocess for start-up imports)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from click.testing import CliRunner

from cpt_kit.cli import main
from conftest import REPO


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_is_quick_and_imports_nothing_heavy():
    code = "import sys, cpt_kit.cli; print(sorted(m for m in ('torch', 'transformers', 'unsloth', 'datasets', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "show"):
        assert command in result.output


def test_show_resolves_overrides():
    result = invoke("show", str(REPO / "recipes" / "language.py"), "--set", "lora.r=16", "--docs")
    assert result.exit_code == 0, result.output
    assert "r = 16" in result.output
    assert "LoRA rank" in result.output


def test_bad_override_exits_2_with_key_and_suggestion():
    result = CliRunner().invoke(main, ["show", str(REPO / "recipes" / "demo.py"), "--set", "train.learnin_rate=1"])
    assert result.exit_code == 2
    assert "train.learnin_rate" in result.output and "train.learning_rate" in result.output
    assert "Traceback" not in result.output


def test_bf16_on_cpu_rejected_before_anything_loads(tmp_path):
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "demo.py"), "--set", "train.precision=bf16",
                                       "--output-dir", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2
    assert "train.precision" in result.output
    assert not (tmp_path / "run").exists()


def test_recipe_with_error_in_file_reports_line(tmp_path):
    recipe = tmp_path / "broken.py"
    recipe.write_text(textwrap.dedent("""\
        from cpt_kit.recipe import Recipe, Model, Train
        RECIPE = Recipe(name="b", model=Model(base="m"),
                        train=Train(learning_rate=-1.0))
    """))
    result = CliRunner().invoke(main, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 2
    assert f"{recipe}:2" in result.output and "train.learning_rate" in result.output


def test_until_and_stage_are_exclusive(tmp_path):
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "demo.py"), "--until", "train",
                                       "--stage", "train"])
    assert result.exit_code == 2 and "either --until or --stage" in result.output
