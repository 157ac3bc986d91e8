from setuptools import find_packages, setup

setup(
    name="floe",
    version="0.1.0",
    description="Train Arctic-style dense-residual Mixture-of-Experts language models",
    python_requires=">=3.10",
    packages=find_packages(include=["moe", "moe.*", "kernels", "kernels.*"]),
    package_data={"moe.data": ["assets/*.model"]},
    install_requires=[
        # A range, not a pin: GPU clusters keep their own CUDA build of torch.
        "torch>=2.5,<3",
        "deepspeed>=0.15.4",  # ZeRO-2; 0.15.4 fixed expert-gradient scaling
        "triton>=3.0",
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "hydra-core>=1.3",
        "numpy>=1.24",
        "datasketch>=1.6",  # MinHash LSH for near-duplicate removal
        "safetensors>=0.4",  # weight export
        "tqdm>=4.66",  # progress bars
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3"]},
)
