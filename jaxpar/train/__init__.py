"""Training scripts for the embedded default models."""
