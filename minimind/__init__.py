"""minimind: train small language models from scratch, in plain PyTorch.

Stages and their homes: tokenizer.py (BPE + chat rendering) -> data.py (JSONL, packing, masks) ->
model.py (the transformer) + loss.py -> train.py (shared training pieces) -> checkpoint.py (model dirs) ->
generate.py (decoding) -> evaluate.py / serve.py.
"""
import os

__version__ = "0.1.0"

# The tokenizer trained by train_tokenizer.py on the embedded default data, shipped so users can skip that step.
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "default_tokenizer")
