"""Serve a trained model over an OpenAI-compatible API, with a web chat page at /.

    pip install -e .[serve]
    python serve_openai_api.py --load_from out/sft                  # then open http://127.0.0.1:8998/
    python serve_openai_api.py --load_from out/sft --max_batch_size 32 --max_seq_len 4096

Any OpenAI client works:  OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="none")
The code lives in minimind/serve.py (request schema, batching scheduler, routes).
"""
import torch

from minimind import cli


def main():
    try:
        from minimind.serve import main as serve_main
    except ImportError as e:
        raise cli.UsageError(str(e)) from None
    serve_main()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run(main)
