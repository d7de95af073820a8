"""A stand-in for Colab's `google.colab` package, for running the Colab notebooks headless in tests
(tests/test_notebooks.py puts tests/fake_colab on the kernel's PYTHONPATH). Only `files` is here."""
