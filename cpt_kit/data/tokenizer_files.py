"""Loading the base tokenizer and saving the one training uses to `data/tokenizer/`."""

from __future__ import annotations

import shutil
from pathlib import Path

from cpt_kit.errors import DataError
from cpt_kit.recipe import Model

SENTENCEPIECE_FILE = "tokenizer.model"


def tokenizer_location(model: Model) -> str:
    """model.tokenizer if set, else the resolved base (a local directory or a hub id)."""
    from cpt_kit.model_source import resolve_base

    return model.tokenizer or resolve_base(model)


def load_tokenizer(model: Model):
    from transformers import AutoTokenizer

    from cpt_kit.model_source import load_kwargs

    location = tokenizer_location(model)
    kwargs = load_kwargs(model)
    if model.tokenizer:
        kwargs.pop("revision", None)
    try:
        return AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load the tokenizer from {location}: {exc}",
                        where="model.tokenizer" if model.tokenizer else "model.base",
                        hint="check the path or hub id (hub ids need network access or a local cache)") from None


def save_tokenizer(tokenizer, model: Model, out_dir: Path) -> list[str]:
    """save_pretrained plus the SentencePiece tokenizer.model of the base, when it has one.

    llama.cpp's converter builds a SentencePiece vocabulary from tokenizer.model; transformers 5
    no longer writes that file itself. Returns the file names written.
    """
    out_dir = Path(out_dir)
    if hasattr(tokenizer, "legacy"):  # transformers 5 drops it on save; it decides the spacing after
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy  # special tokens (llama.cpp uses legacy)
    tokenizer.save_pretrained(str(out_dir))
    sp_model = _find_sentencepiece_model(model)
    if sp_model is not None:
        shutil.copyfile(sp_model, out_dir / SENTENCEPIECE_FILE)
    return sorted(p.name for p in out_dir.iterdir())


def _find_sentencepiece_model(model: Model) -> Path | None:
    location = tokenizer_location(model)
    local = Path(location).expanduser() / SENTENCEPIECE_FILE
    if local.is_file():
        return local
    if Path(location).expanduser().exists():
        return None
    try:  # hub id: the file is in the cache when the tokenizer was downloaded with it
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(location, SENTENCEPIECE_FILE, revision=model.revision))
    except Exception:  # noqa: BLE001 - not every tokenizer has a SentencePiece model
        return None


def tokenizer_fingerprint(model: Model) -> dict:
    """Hashes of the local tokenizer files (the base id when it is a hub model)."""
    from cpt_kit.manifest import file_sha256
    from cpt_kit.model_source import TINY_PREFIX

    if model.tokenizer is None and model.base.startswith(TINY_PREFIX):  # identified without building it
        from cpt_kit.tiny_model import tiny_base_digest
        return {"tiny": tiny_base_digest(Path(model.base[len(TINY_PREFIX):]).expanduser())}
    try:
        location = Path(tokenizer_location(model)).expanduser()
    except Exception:  # noqa: BLE001 - an unresolvable base fails later with its own error
        return {"tokenizer": model.tokenizer or model.base}
    if not location.is_dir():
        return {"tokenizer": str(location)}
    names = ("tokenizer.json", SENTENCEPIECE_FILE, "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "merges.txt")
    return {name: file_sha256(location / name) for name in names if (location / name).is_file()}
