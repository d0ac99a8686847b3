"""The model's data: config.json reading, checkpoint tensors, the tokenizer, tiny random checkpoints."""
