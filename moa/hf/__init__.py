"""Hugging Face interop: the transformers wrapper (modeling), its lazy registration, export.

This package imports nothing heavy itself: `import moa` loads `registration` only."""
