"""GGUF conversion (llama.cpp's own converter) and quantization (llama-cpp-python), checked.

- `convert_to_gguf(model_dir, out_file, outtype)` runs `convert_hf_to_gguf.py` of the installed
  llama-cpp-python version as a subprocess (`sys.executable`); a failure raises ExportError with
  the converter's own last stderr lines.
- `quantize_gguf(in_file, out_file, quant, ...)` calls `llama_cpp.llama_model_quantize` in a
  subprocess (`quantize_child`: a crash in C cannot take the caller down, and llama.cpp's log, which
  says how many tensors needed a fallback type, can be read), optionally with token_embd/output
  types and an importance matrix.
- Every output is written to a temporary name, checked with `check_gguf` (llama.cpp's own parser
  reads its header, it has tensors, every tensor's data lies inside the file) and only then renamed.
- `prepare_converter_dir` gives the converter the added tokens that transformers 5 keeps only
  in tokenizer.json (the converter reads them from tokenizer_config.json's added_tokens_decoder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from cpt_kit.errors import ExportError
from cpt_kit.hardware import cpu_threads
from cpt_kit.rundir import atomic_path

OUTTYPES = ("f16", "bf16", "f32", "q8_0")
FALLBACK_RE = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
IMATRIX_RE = re.compile(r"cpt-kit: using (\d+) importance matrix entries")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def dir_size(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def check_disk_space(model_dir: Path, out_dir: Path, n_quants: int) -> dict:
    """Raise ExportError unless out_dir's disk has room for F16 + quants (estimate: model size x (1 + n))."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    needed = int(dir_size(model_dir) * (1 + n_quants))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ExportError(f"not enough free disk space for the GGUF files: about {needed / 2**30:.2f} GiB needed "
                          f"(merged model x {1 + n_quants}), {free / 2**30:.2f} GiB free", where=str(probe),
                          hint="free some space, write the run elsewhere (--output-dir), or list fewer export.quantizations")
    return {"disk_needed_bytes": needed, "disk_free_bytes": free}


def check_gguf(path: Path) -> dict:
    """Check a GGUF is complete (llama.cpp's parser reads its header, it has tensors, every tensor's
    data lies inside the file); returns {tensors, bytes, architecture, tensor_types, token_embd_type, output_type}."""
    from cpt_kit.export.gguf_header import read_header

    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        header = read_header(path)
    except ValueError as exc:
        raise ExportError(f"{path.name} is not a readable GGUF file ({exc})", where=str(path),
                          hint="the file is truncated or corrupt: delete it and export again") from None
    tensors = header["tensors"]
    if not tensors:
        raise ExportError(f"{path.name} holds no tensors", where=str(path), hint="delete it and export again")
    end = max(offset + nbytes for _, _, offset, nbytes in tensors)
    if end > size:
        raise ExportError(f"{path.name} is truncated: tensor data ends at byte {end}, the file has {size}",
                          where=str(path), hint="delete it and export again")
    types = {name: kind.upper() for name, kind, _, _ in tensors}
    return {"tensors": len(tensors), "bytes": size, "architecture": header["architecture"],
            "tensor_types": dict(Counter(types.values())), "token_embd_type": types.get("token_embd.weight"),
            "output_type": types.get("output.weight")}


def added_tokens(model_dir: Path) -> list[dict]:
    """Added tokens from tokenizer.json: [{"id", "content", "special"}], sorted by id."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return sorted(({"id": t["id"], "content": t["content"], "special": bool(t.get("special"))}
                   for t in data.get("added_tokens", [])), key=lambda t: t["id"])


def prepare_converter_dir(model_dir: Path, staging: Path) -> Path:
    """A directory the converter reads: `model_dir`'s files (symlinked) plus the added tokens it needs.

    For a SentencePiece tokenizer (tokenizer.model) llama.cpp's converter takes the vocabulary from
    tokenizer.model and the added tokens from tokenizer_config.json `added_tokens_decoder`; tokens
    beyond tokenizer.model that it does not find there become "[PADn]". transformers 5 writes the
    added tokens only into tokenizer.json, so they are copied into the staged tokenizer_config.json
    (special tokens as control tokens, others as user-defined), leaving `model_dir` untouched.
    """
    model_dir, staging = Path(model_dir).resolve(), Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (staging / item.name).symlink_to(item)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokens = added_tokens(model_dir)
    if (model_dir / "tokenizer.model").is_file() and tokens and not config.get("added_tokens_decoder"):
        sp_pieces = _sentencepiece_specials(model_dir / "tokenizer.model")
        config["added_tokens_decoder"] = {
            str(t["id"]): {"content": t["content"], "special": t["special"], "lstrip": False, "rstrip": False,
                           "normalized": not t["special"], "single_word": False}
            for t in tokens if sp_pieces.get(t["id"]) != t["content"]}
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return staging


def _sentencepiece_specials(path: Path) -> dict[int, str]:
    """unk/control pieces of a SentencePiece model (<unk>, <s>, </s>): keep their own token types."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    return {i: sp.IdToPiece(i) for i in range(sp.GetPieceSize()) if sp.IsUnknown(i) or sp.IsControl(i)}


def convert_to_gguf(model_dir: Path, out_file: Path, outtype: str = "f16", *,
                    log: Optional[Callable[[str], None]] = None) -> dict:
    """HF model directory -> GGUF at `out_file` (written under a temporary name, checked, renamed)."""
    from cpt_kit.export.llama_cpp import converter_script

    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}", where="export.outtype", hint=f"one of {', '.join(OUTTYPES)}")
    model_dir, out_file = Path(model_dir).resolve(), Path(out_file).resolve()  # the converter runs in another cwd
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a model directory (no config.json)", where=str(model_dir))
    script = converter_script()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cpt-kit-convert-") as tmp, atomic_path(out_file) as partial:
        staged = prepare_converter_dir(model_dir, Path(tmp) / "model")
        cmd = [sys.executable, str(script), str(staged), "--outfile", str(partial), "--outtype", outtype]
        if log:
            log(f"converting with {script} ({outtype})")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with status {proc.returncode}"
            raise ExportError(f"llama.cpp's converter {how}; its last output:\n{_tail(proc.stderr or proc.stdout)}",
                              where=str(model_dir),
                              hint=f"the error above is the converter's own ({script})")
        info = check_gguf(partial)
    info.update(seconds=round(time.perf_counter() - started, 2), outtype=outtype, path=str(out_file))
    return info


def quantize_gguf(in_file: Path, out_file: Path, quant: str, *, nthread: Optional[int] = None,
                  token_embedding_type: Optional[str] = None, output_tensor_type: Optional[str] = None,
                  imatrix: Optional[Path] = None) -> dict:
    """Quantize a GGUF to `quant` (Q4_K_M, Q5_K_M, Q8_0 ...) with llama-cpp-python; checked, renamed.

    `token_embedding_type` / `output_tensor_type` ("Q8_0", "F16") override llama.cpp's choice for
    token_embd.weight / output.weight; `imatrix` is an importance matrix GGUF (`imatrix.compute_imatrix`).
    The result counts the tensors that fell back to another type (llama.cpp's log) and lists the
    tensor types in the file.
    """
    import llama_cpp

    quant = quant.upper()
    if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}"):
        raise ExportError(f"llama.cpp has no quantization type {quant!r}", where="export.quantizations",
                          hint="e.g. Q4_K_M, Q5_K_M, Q6_K, Q8_0")
    in_file, out_file = Path(in_file).resolve(), Path(out_file).resolve()
    started = time.perf_counter()
    with atomic_path(out_file) as partial:
        args = {"src": str(in_file), "dst": str(partial), "quant": quant, "nthread": nthread or cpu_threads(),
                "token_embedding_type": token_embedding_type, "output_tensor_type": output_tensor_type,
                "imatrix": str(imatrix) if imatrix else None}
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "cpt_kit.export.quantize_child", json.dumps(args)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not partial.exists():
            how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else "failed"
            raise ExportError(f"quantizing {in_file.name} to {quant} {how}; llama.cpp said:\n{_tail(proc.stderr + proc.stdout)}",
                              where=str(in_file))
        info = check_gguf(partial)
    fallback = FALLBACK_RE.search(proc.stderr + proc.stdout)
    info.update(quant=quant, seconds=round(time.perf_counter() - started, 2), path=str(out_file),
                fallback_tensors=int(fallback.group(1)) if fallback else 0,
                fallback_of=int(fallback.group(2)) if fallback else info["tensors"],
                token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type,
                imatrix_entries=int(IMATRIX_RE.search(proc.stderr).group(1)) if imatrix else 0)
    return info
