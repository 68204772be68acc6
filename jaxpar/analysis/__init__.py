"""What compiled programs do: collectives, bytes and memory, read from XLA's own output."""
