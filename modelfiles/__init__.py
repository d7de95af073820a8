"""Ollama TEMPLATE files, one per chat-template family (installed as cpt_kit.modelfiles)."""
