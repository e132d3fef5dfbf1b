"""minimind: train small language models from scratch, in plain PyTorch.

The package's map, bottom up (docs/en/architecture.md draws it; tests/test_architecture.py checks it):
errors, runtime, jsonio -> config, loss, model, tokenizer, optim -> data, formats, hf, checkpoint ->
generate, evaluate, tools, serve, lora -> flags, runlog, resume, train, rl -> the train_*.py scripts.
"""
import os

__version__ = "0.1.0"

# The tokenizer trained by train_tokenizer.py on the embedded default data, shipped so users can skip that step.
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "default_tokenizer")
