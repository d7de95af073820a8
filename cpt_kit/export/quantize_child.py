"""`python -m cpt_kit.export.quantize_child JSON`: one `llama_model_quantize` call, in its own process
(a crash in C cannot take the caller down, and llama.cpp's log on stderr can be read: it says how
many tensors needed a fallback type). JSON keys: src, dst, quant, nthread, token_embedding_type,
output_tensor_type (a GGML type name or null), imatrix (an imatrix GGUF path or null)."""

from __future__ import annotations

import ctypes
import json
import sys


def quantize(args: dict) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + args["quant"])
    params.nthread = int(args["nthread"])
    for key in ("token_embedding_type", "output_tensor_type"):
        if args.get(key):
            setattr(params, key, getattr(llama_cpp, "GGML_TYPE_" + args[key]))
    keep_alive = []
    if args.get("imatrix"):
        from cpt_kit.export.imatrix import load_imatrix

        entries = load_imatrix(args["imatrix"])
        table = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()  # zeroed: the last one ends the list
        for row, (name, values) in zip(table, entries.items()):
            keep_alive.append((name.encode(), values))
            row.name = keep_alive[-1][0]
            row.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            row.size = values.size
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        print(f"cpt-kit: using {len(entries)} importance matrix entries from {args['imatrix']}", file=sys.stderr)
    return llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(params))


if __name__ == "__main__":
    sys.exit(1 if quantize(json.loads(sys.argv[1])) else 0)
