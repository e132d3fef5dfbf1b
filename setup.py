from setuptools import find_packages, setup

setup(
    name="minimind",
    version="0.1.0",
    description="Train small language models from scratch in plain PyTorch: tokenizer, pretraining, SFT, LoRA, "
                "DPO, GRPO, evaluation, chat with tools and an OpenAI-compatible server.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minimind", "minimind.*"]),
    package_data={"minimind": ["default_tokenizer/*.json", "static/*"]},
    install_requires=["torch>=2.5", "tokenizers>=0.19", "numpy", "swanlab", "tqdm", "safetensors"],
    extras_require={
        # OpenAI-compatible server + web chat page (serve_openai_api.py)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # GGUF export for llama.cpp / Ollama (convert_model.py --to gguf): the writer published by llama.cpp's authors
        "gguf": ["gguf>=0.19"],
        # PNG loss curves and length histograms (plot_metrics.py, prepare_data.py stats --plot)
        "plot": ["matplotlib>=3.7"],
        # tests: transformers proves checkpoint interop, openai is the reference API client, selenium drives the
        # headless Chromium that .ci/install_browser.sh installs for the web-page test; gguf and matplotlib for the
        # GGUF and plot tests (llama-cpp-python, which compiles llama.cpp, comes from .ci/install_llama_cpp.sh)
        "test": ["pytest", "transformers", "openai>=1.0", "selenium>=4.10", "fastapi>=0.110", "uvicorn>=0.29",
                 "gguf>=0.19", "matplotlib>=3.7"],
    },
)
