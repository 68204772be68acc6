"""Benchmark sweeps behind `python -m jaxpar.bench <name>`."""
