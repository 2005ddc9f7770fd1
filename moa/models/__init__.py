"""Whole models (the language model, the Reactive Transformer), what they cost (params),
generation, and retrofit. Importing the package registers every architecture with
`build_model` (moa/models/registry.py)."""

from moa.models import language_model, reactive  # noqa: F401  (register their architectures)
