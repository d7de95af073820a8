"""Importance matrix from the run's own training text, with llama.cpp's `llama-imatrix`.

`llama-imatrix` is not part of the llama-cpp-python wheel, but everything it links against is: the
wheel installs libllama, libggml* and libllama-common. So on first use only `tools/imatrix/imatrix.cpp`
of the same version's source (the sdist the GGUF converter comes from) is compiled against the
installed libraries: one C++ file, 15-30 s on 2 cores, no cmake, offline. The binary is cached in the
first writable of `$CPT_KIT_CACHE`, `<repo>/.cache` and `~/.cache/cpt-kit` (under `llama-tools/`, keyed
by version and install path) and found in any of them.

The resulting imatrix GGUF (sums of squared activations per weight column, and counts) is read
back with the `gguf` package and handed to `llama_model_quantize` as `llama_model_imatrix_data`
(`gguf.quantize_gguf`), the same normalisation llama-quantize applies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

from cpt_kit.errors import ExportError
from cpt_kit.hardware import cpu_threads

TOOL = "llama-imatrix"
CHUNK_TOKENS = 512


def _installed_library_dirs() -> list[Path]:
    """Folders of the installed wheel's shared libraries (llama_cpp/lib and the wheel's own lib/)."""
    dist = metadata.distribution("llama-cpp-python")
    dirs = {Path(dist.locate_file(f)).resolve().parent for f in dist.files or []
            if f.name.startswith(("libllama", "libggml")) and ".so" in f.name}
    return sorted(dirs)


def tool_cache_dirs(version: str, lib_dirs: Sequence[Path]) -> list[Path]:
    from cpt_kit.export.llama_cpp import REPO_CACHE

    key = hashlib.sha1("\n".join(map(str, lib_dirs)).encode()).hexdigest()[:10]
    name = f"{version}-{key}"
    roots = [Path(os.environ["CPT_KIT_CACHE"]).expanduser()] if os.environ.get("CPT_KIT_CACHE") else []
    roots += [REPO_CACHE.parent, Path("~/.cache/cpt-kit").expanduser()]
    return [root / "llama-tools" / name for root in roots]


def imatrix_tool(log: Optional[Callable[[str], None]] = None) -> Path:
    """Path of a working `llama-imatrix` for the installed llama-cpp-python; compiled on first use."""
    from cpt_kit.export.llama_cpp import installed_version, llama_cpp_dir

    version = installed_version()
    lib_dirs = _installed_library_dirs()
    caches = tool_cache_dirs(version, lib_dirs)
    for cache in caches:
        if (cache / TOOL).is_file() and os.access(cache / TOOL, os.X_OK):
            return cache / TOOL
    if not any((d / "libllama-common.so").exists() for d in lib_dirs):
        raise ExportError(f"the installed llama-cpp-python {version} has no libllama-common, which llama-imatrix needs",
                          where="export.imatrix", hint="reinstall it with scripts/setup.sh, or set export.imatrix=False")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise ExportError("no C++ compiler to build llama-imatrix (needed once, for export.imatrix)",
                          where="export.imatrix", hint="install g++ (e.g. apt-get install g++), or set export.imatrix=False")
    src = llama_cpp_dir()
    target = next((c for c in caches if _writable(c)), caches[-1])
    target.mkdir(parents=True, exist_ok=True)
    rpath = ":".join(map(str, lib_dirs))
    cmd = [compiler, "-O2", "-std=c++17", "-pthread", *(f"-I{src / d}" for d in ("common", "include", "ggml/include", "vendor")),
           str(src / "tools" / "imatrix" / "imatrix.cpp"), *(f"-L{d}" for d in lib_dirs),
           "-lllama-common", "-lllama", "-lggml", "-lggml-base", f"-Wl,--disable-new-dtags,-rpath,{rpath}"]
    if log:
        log(f"building {TOOL} from {src} (once; cached in {target})")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        proc = subprocess.run([*cmd, "-o", str(Path(tmp) / TOOL)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join("    " + line for line in proc.stderr.strip().splitlines()[-10:])
            raise ExportError(f"compiling {TOOL} failed:\n{tail}", where=str(src / "tools" / "imatrix"),
                              hint="set export.imatrix=False to quantize without an importance matrix")
        os.replace(Path(tmp) / TOOL, target / TOOL)
    if log:
        log(f"built {TOOL} in {time.perf_counter() - started:.0f} s")
    return target / TOOL


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK)


def write_training_text(tokenizer, blocks: Sequence[Sequence[int]], out: Path, max_tokens: int) -> int:
    """Decode evenly spaced training blocks (up to `max_tokens` tokens) into `out`; returns the token count."""
    step = max(1, len(blocks) * len(blocks[0]) // max_tokens) if blocks else 1
    chosen, total = [], 0
    for block in blocks[::step]:
        if total >= max_tokens:
            break
        chosen.append(tokenizer.decode(list(block), skip_special_tokens=True))
        total += len(block)
    out.write_text("\n\n".join(chosen), encoding="utf-8")
    return total


def compute_imatrix(model: Path, text_file: Path, out: Path, tokens: int, *, chunk: int = CHUNK_TOKENS,
                    threads: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run llama-imatrix on `model` over `text_file` (about `tokens` tokens in chunks of `chunk`) -> `out`."""
    from cpt_kit.rundir import atomic_path

    tool = imatrix_tool(log)
    chunks = max(1, tokens // chunk)
    started = time.perf_counter()
    with atomic_path(out) as partial:
        cmd = [str(tool), "-m", str(model), "-f", str(text_file), "-o", str(partial), "-c", str(chunk),
               "-b", str(chunk), "--chunks", str(chunks), "--no-ppl", "-t", str(threads or cpu_threads()),
               "--output-frequency", str(10**6)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not partial.is_file():
            tail = "\n".join("    " + line for line in (proc.stderr or proc.stdout).strip().splitlines()[-10:])
            raise ExportError(f"{TOOL} failed:\n{tail}", where=str(model),
                              hint="set export.imatrix=False to quantize without an importance matrix")
        entries = len(load_imatrix(partial))
    return {"file": str(out), "chunks": chunks, "chunk_tokens": chunk, "entries": entries,
            "seconds": round(time.perf_counter() - started, 2)}


def load_imatrix(path: Path) -> dict[str, "object"]:
    """{tensor name: float32 importance per column} from an imatrix GGUF, normalised like llama-quantize
    (sum of squared activations / count; 1 where a tensor saw no tokens)."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sums, counts = {}, {}
    for tensor in reader.tensors:
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name[:-len(".in_sum2")]] = np.asarray(tensor.data, dtype=np.float32)
        elif tensor.name.endswith(".counts"):
            counts[tensor.name[:-len(".counts")]] = np.asarray(tensor.data, dtype=np.float32)
    out = {}
    for name, total in sums.items():
        count = counts[name].reshape(-1)
        rows = total.reshape(len(count), -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(count[:, None] > 0, rows / np.maximum(count[:, None], 1), 1.0)
        out[name] = np.ascontiguousarray(values.reshape(-1), dtype=np.float32)
    return out
