"""cpt-kit: continued-pretraining recipes on Unsloth, exported to GGUF and Ollama."""

__version__ = "0.1.0"
