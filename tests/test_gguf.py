"""GGUF export: llama.cpp's converter + llama-cpp-python quantization, integrity checks, failure modes."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from cpt_kit.errors import ExportError
from cpt_kit.export.quant_gate import DEFAULT_LIMITS

NEW_TOKENS = ("ĉiutage", "kolektiĝis", "ŝtonpontoj")


def _ctx(recipe, run_root: Path):
    from rich.console import Console

    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.rundir import RunDir

    run = RunDir(run_root)
    return StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True))


@pytest.fixture(scope="module")
def exported(tiny_tied, tmp_path_factory):
    """A tied tiny model with an extended vocabulary, merged (untied) and run through the gguf stage."""
    from test_merge import make_adapter

    from cpt_kit.export import gguf_stage
    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.recipe import Export, Model, Recipe

    root = tmp_path_factory.mktemp("gguf") / "run"
    recipe = Recipe(name="tiny", model=Model(base=str(tiny_tied), load_in_4bit=False),
                    export=Export(quantizations=("Q8_0", "Q4_K_M")))
    ctx = _ctx(recipe, root)
    make_adapter(tiny_tied, ctx.run.adapter, new_tokens=NEW_TOKENS)
    merge_adapter(tiny_tied, ctx.run.adapter, ctx.run.merged)
    metrics = gguf_stage.run(ctx)
    return ctx, metrics


@pytest.mark.slow
def test_gguf_stage_writes_checked_files(exported):
    ctx, metrics = exported
    names = sorted(p.name for p in ctx.run.gguf.iterdir())
    assert names == ["quality.json", "tiny-F16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    assert set(metrics["files"]) == {"F16", "Q8_0", "Q4_K_M"}
    for info in metrics["files"].values():
        assert info["tensors"] > 0 and info["architecture"] == "llama"
        assert (ctx.run.root / info["file"]).stat().st_size == info["bytes"]
    assert metrics["Q4_K_M_fallback"] == f"0 of {metrics['files']['Q4_K_M']['tensors']}"
    assert metrics["files"]["Q4_K_M"]["bytes"] < metrics["files"]["Q8_0"]["bytes"] < metrics["files"]["F16"]["bytes"]
    json.dumps(metrics)


@pytest.mark.slow
def test_gguf_stage_gates_each_quant_on_the_probe_texts_without_heldout_data(exported):
    """A run without data/heldout (`cpt-kit export --adapter`): quality.json is measured on probe-text blocks."""
    ctx, metrics = exported
    quality = json.loads((ctx.run.gguf / "quality.json").read_text())
    assert quality["block_source"] == "probe_texts" and quality["blocks"] >= 2
    assert quality["reference"]["name"] == "F16" and quality["reference"]["tokens"] > 0
    assert set(quality["formats"]) == {"Q8_0", "Q4_K_M"} and quality["passed"] and quality["failed"] == []
    for quant, gate in quality["formats"].items():
        assert gate["bytes"] == metrics["files"][quant]["bytes"] and gate["fallback_tensors"] == 0
        assert (gate["max_ppl_delta"], gate["max_kl"]) == DEFAULT_LIMITS[quant] and gate["reasons"] == []
        assert metrics[f"{quant}_kl"] == round(gate["mean_kl"], 5)
    assert 0 <= quality["formats"]["Q8_0"]["mean_kl"] < quality["formats"]["Q4_K_M"]["mean_kl"]
    assert metrics["quant_failed"] == []


@pytest.mark.slow
def test_gguf_carries_untied_head_and_added_tokens(exported):
    from gguf import GGUFReader

    ctx, _ = exported
    reader = GGUFReader(ctx.run.gguf / "tiny-F16.gguf")
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names  # untied by the merge: lm_head is its own tensor
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    types = reader.fields["tokenizer.ggml.token_type"]
    assert len(vocab) == 1003
    from cpt_kit.export.gguf_header import read_header
    from cpt_kit.export.quant_quality import vocab_size
    assert read_header(ctx.run.gguf / "tiny-Q8_0.gguf")["n_vocab"] == vocab_size(ctx.run.gguf / "tiny-F16.gguf") == 1003
    for offset, token in enumerate(NEW_TOKENS):
        assert vocab[1000 + offset] == token
        assert int(types.parts[types.data[1000 + offset]][0]) == 4  # USER_DEFINED
    assert not [t for t in vocab if t.startswith("[PAD")]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_gguf_loads_and_generates(exported, quant):
    import llama_cpp
    from transformers import AutoTokenizer

    ctx, _ = exported
    path = ctx.run.gguf / f"tiny-{quant}.gguf"
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, verbose=False)
    out = llm.create_completion("La kato", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(ctx.run.merged)
    for text in ("La ŝtonpontoj", "kolektiĝis", "Hello world"):
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text


@pytest.mark.slow
def test_truncated_gguf_is_detected(exported, tmp_path):
    from cpt_kit.export.gguf import check_gguf

    ctx, _ = exported
    data = (ctx.run.gguf / "tiny-Q8_0.gguf").read_bytes()
    for cut in (len(data) - 4096, len(data) // 2, 64):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(ExportError, match="truncated|not a readable GGUF"):
            check_gguf(broken)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ExportError):
        check_gguf(tmp_path / "empty.gguf")


def _fake_llama_cpp(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(
        "import argparse, os, signal, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('model'); p.add_argument('--outfile'); p.add_argument('--outtype')\n"
        "args = p.parse_args()\n" + body)
    return folder


def test_converter_killed_midway_leaves_no_final_file(tiny_base, tmp_path, monkeypatch):
    from cpt_kit.export.gguf import convert_to_gguf

    folder = _fake_llama_cpp(tmp_path, "open(args.outfile, 'wb').write(b'GGUF' + bytes(1000))\n"
                                       "os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setenv("CPT_KIT_LLAMA_CPP", str(folder))
    out = tmp_path / "gguf" / "m-F16.gguf"
    with pytest.raises(ExportError, match="killed by signal 9"):
        convert_to_gguf(tiny_base, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_converter_output_that_fails_the_check_is_not_renamed(tiny_base, tmp_path, monkeypatch):
    from cpt_kit.export.gguf import convert_to_gguf

    folder = _fake_llama_cpp(tmp_path, "open(args.outfile, 'wb').write(b'GGUF' + bytes(100))\n")
    monkeypatch.setenv("CPT_KIT_LLAMA_CPP", str(folder))
    out = tmp_path / "gguf" / "m-F16.gguf"
    with pytest.raises(ExportError, match="GGUF"):
        convert_to_gguf(tiny_base, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_converter_failure_shows_its_own_error(tiny_base, tmp_path):
    import shutil

    from cpt_kit.export.gguf import convert_to_gguf

    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "gguf" / "m-F16.gguf"
    with pytest.raises(ExportError) as info:
        convert_to_gguf(model, out)
    assert "NoSuchModelForCausalLM" in info.value.message and "exited with status" in info.value.message
    assert list(out.parent.iterdir()) == []


def test_disk_space_is_checked_first(tiny_base, tmp_path, monkeypatch):
    import shutil

    from cpt_kit.export import gguf

    monkeypatch.setattr(gguf.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough free disk space") as info:
        gguf.check_disk_space(tiny_base, tmp_path / "gguf", 2)
    assert "x 3" in info.value.message
    monkeypatch.undo()
    assert gguf.check_disk_space(tiny_base, tmp_path / "gguf", 2)["disk_needed_bytes"] > 0


def test_unknown_quantization_type(tmp_path):
    from cpt_kit.export.gguf import quantize_gguf

    with pytest.raises(ExportError, match="no quantization type"):
        quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q9_Z")


def test_prepare_converter_dir_adds_tokens_transformers5_keeps_in_tokenizer_json(tiny_chatml, tmp_path):
    from cpt_kit.export.gguf import prepare_converter_dir

    staged = prepare_converter_dir(tiny_chatml, tmp_path / "staged")
    decoder = json.loads((staged / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    contents = {v["content"]: v["special"] for v in decoder.values()}
    assert contents == {"<|im_start|>": True, "<|im_end|>": True}  # <unk>/<s>/</s> keep tokenizer.model's types
    assert (staged / "tokenizer.model").resolve() == (tiny_chatml / "tokenizer.model").resolve()
    assert "added_tokens_decoder" not in json.loads((tiny_chatml / "tokenizer_config.json").read_text())


def test_llama_cpp_dir_lookup(tmp_path, monkeypatch):
    from cpt_kit.export import llama_cpp

    monkeypatch.setenv("CPT_KIT_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ExportError, match="has no convert_hf_to_gguf.py"):
        llama_cpp.llama_cpp_dir()
    monkeypatch.delenv("CPT_KIT_LLAMA_CPP")
    # no cached sdist: it is fetched with pip download (faked here) and unpacked into the cache
    monkeypatch.setattr(llama_cpp, "cache_dirs", lambda: [tmp_path / "empty"])
    monkeypatch.setattr(llama_cpp, "installed_version", lambda: "9.9.9")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sdist = tmp_path / "src" / "llama_cpp_python-9.9.9"
    (sdist / "vendor" / "llama.cpp").mkdir(parents=True)
    (sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").write_text("# converter\n")

    def fake_run(cmd, **kwargs):
        target = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(target / "llama_cpp_python-9.9.9.tar.gz", "w:gz") as tar:
            tar.add(sdist, arcname=sdist.name)
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(llama_cpp.subprocess, "run", fake_run)
    found = llama_cpp.llama_cpp_dir()
    assert found == tmp_path / "home" / ".cache" / "cpt-kit" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp"
    assert (found / "convert_hf_to_gguf.py").read_text() == "# converter\n"
    assert os.listdir(found.parents[2]) == ["llama_cpp_python-9.9.9"]
