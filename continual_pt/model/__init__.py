"""The model: building it from a config, a Hugging Face folder or a hub name; the fused output layer and
loss; FLOPs per token. Knows nothing of DeepSpeed."""
