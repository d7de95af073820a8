"""Read a GGUF's header with llama.cpp's own parser: `gguf_init_from_file` of the installed
llama-cpp-python's libggml-base (the same code that later loads the model), through ctypes.

This replaces `gguf.GGUFReader` for the checks after each conversion/quantization: GGUFReader builds
a numpy view per array element, which took 36 s per file for a 262k-token vocabulary (three files
per export: most of the gguf stage's overhead over running the converter and quantizer by hand).
llama.cpp's parser reads the same header in milliseconds and validates it (magic, version, key and
tensor info types, contiguous tensor offsets); only tensor names, types, offsets and sizes are read.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    import llama_cpp  # loads libllama and its ggml libraries first

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _InitParams], ctypes.c_void_p),
        "gguf_free": ([ctypes.c_void_p], None),
        "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_get_data_offset": ([ctypes.c_void_p], ctypes.c_size_t),
        "gguf_get_tensor_name": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_tensor_offset": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_tensor_size": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_tensor_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_find_key": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
        "gguf_get_val_str": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_arr_n": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "ggml_type_name": ([ctypes.c_int], ctypes.c_char_p),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


def read_header(path: Path) -> dict:
    """{"architecture", "n_vocab", "data_offset", "tensors": [(name, type name, offset in file, bytes)]};
    ValueError when llama.cpp cannot parse the header."""
    lib = _library()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise ValueError("llama.cpp's GGUF parser rejected the header")
    try:
        base = lib.gguf_get_data_offset(ctx)
        tensors = [(lib.gguf_get_tensor_name(ctx, i).decode(), lib.ggml_type_name(lib.gguf_get_tensor_type(ctx, i)).decode(),
                    base + lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i))
                   for i in range(lib.gguf_get_n_tensors(ctx))]
        key = lib.gguf_find_key(ctx, b"general.architecture")
        arch = lib.gguf_get_val_str(ctx, key).decode() if key >= 0 else None
        key = lib.gguf_find_key(ctx, b"tokenizer.ggml.tokens")
        n_vocab = lib.gguf_get_arr_n(ctx, key) if key >= 0 else None
    finally:
        lib.gguf_free(ctx)
    return {"architecture": arch, "n_vocab": n_vocab, "data_offset": base, "tensors": tensors}
