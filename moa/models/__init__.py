"""Whole models (the language model), what they cost (params), generation, and retrofit."""
