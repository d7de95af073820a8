"""Find llama.cpp's `convert_hf_to_gguf.py` for the installed llama-cpp-python version.

The converter ships in llama-cpp-python's source distribution (`vendor/llama.cpp/`). Using the
converter of the same version as the installed runtime keeps the GGUF and the runtime in step.
Lookup order:

1. `$CPT_KIT_LLAMA_CPP`: a llama.cpp checkout (holds `convert_hf_to_gguf.py`).
2. an unpacked sdist of the installed version in a cache directory: `$CPT_KIT_CACHE`,
   `<repo>/.cache/sdist`, `~/.cache/cpt-kit`.
3. `pip download --no-deps --no-binary :all: llama-cpp-python==<version>` (needs only the package
   registry, or a local wheelhouse/index configured for pip), unpacked into `~/.cache/cpt-kit`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from cpt_kit.errors import ExportError

ENV_VAR = "CPT_KIT_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "sdist"


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise ExportError("llama-cpp-python is not installed",
                          hint='install it: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
                               "pip install llama-cpp-python") from None


def cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CPT_KIT_CACHE"):
        dirs.append(Path(os.environ["CPT_KIT_CACHE"]).expanduser())
    dirs += [REPO_CACHE, Path("~/.cache/cpt-kit").expanduser()]
    return dirs


def llama_cpp_dir(download: bool = True) -> Path:
    """The llama.cpp source directory holding the converter scripts (see the module docstring)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not (path / CONVERTER).is_file():
            raise ExportError(f"{path} has no {CONVERTER}", where=f"${ENV_VAR}",
                              hint="point it to a llama.cpp checkout, or unset it to use the one of the installed llama-cpp-python")
        return path
    version = installed_version()
    unpacked = f"llama_cpp_python-{version}"
    for cache in cache_dirs():
        for name in (unpacked, f"llama-cpp-python-{version}"):
            candidate = cache / name / "vendor" / "llama.cpp"
            if (candidate / CONVERTER).is_file():
                return candidate
    if not download:
        raise ExportError(f"no llama.cpp converter for llama-cpp-python {version} in {', '.join(map(str, cache_dirs()))}")
    return _download_sdist(version, Path("~/.cache/cpt-kit").expanduser())


def _download_sdist(version: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise ExportError(f"could not download the llama-cpp-python {version} source (for its GGUF converter):\n{tail}",
                              hint=f"set ${ENV_VAR} to a llama.cpp checkout, or unpack the sdist into {cache}")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name or m.name.endswith("/vendor/llama.cpp")]
            tar.extractall(tmp, members=members, filter="data")
        top = next(p for p in Path(tmp).iterdir() if p.is_dir() and (p / "vendor" / "llama.cpp" / CONVERTER).is_file())
        final = cache / f"llama_cpp_python-{version}"
        if not final.exists():
            os.replace(top, final)
    return final / "vendor" / "llama.cpp"


def converter_script(name: str = CONVERTER) -> Path:
    """Path of `convert_hf_to_gguf.py` (or `convert_lora_to_gguf.py` with name=LORA_CONVERTER)."""
    path = llama_cpp_dir() / name
    if not path.is_file():
        raise ExportError(f"{path} does not exist", hint=f"set ${ENV_VAR} to a complete llama.cpp checkout")
    return path
