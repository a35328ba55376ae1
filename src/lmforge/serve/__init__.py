"""Serving: the OpenAI-compatible HTTP server over `lmforge.infer` (continuous batching), its
metrics, the web chat page, and the terminal chat."""
