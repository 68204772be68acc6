"""The OpenAI-compatible HTTP server (python -m jaxpar.serve)."""
