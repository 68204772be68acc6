"""The model: what is computed (a Llama-family decoder in Flax NNX)."""
