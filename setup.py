from setuptools import find_packages, setup

# One import root, `floe`, so that floe installs no top-level name another distribution owns
# (`kernels` is Hugging Face's kernel hub, required by transformers 5.x; `moe` is an unrelated
# project on the package index). The repository keeps the layout its users know:
#   moe/                    -> floe          (the model rooms, the run wing, data, parallel, plan)
#   kernels/floe_kernels/   -> floe.kernels  (Triton kernels beside their references)
# kernels/ itself carries no __init__.py: with the repository root on sys.path (python -m pytest,
# python -c), a package directory named `kernels` would shadow Hugging Face's.
PACKAGE_DIR = {"floe": "moe", "floe.kernels": "kernels/floe_kernels"}
PACKAGES = (["floe"] + [f"floe.{p}" for p in find_packages(where="moe")]
            + ["floe.kernels"] + [f"floe.kernels.{p}" for p in find_packages(where="kernels/floe_kernels")])

setup(
    name="floe",
    version="0.1.0",
    description="Train Arctic-style dense-residual Mixture-of-Experts language models",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"floe.data": ["assets/*.model"]},
    install_requires=[
        # A range, not a pin: GPU clusters keep their own CUDA build of torch.
        "torch>=2.5,<3",
        # ZeRO-2 and the engine; floe touches a few of its internals (moe/parallel/, each touch commented), checked on
        # this range only: keep in step with floe.parallel.lifecycle.TESTED_DEEPSPEED.
        "deepspeed>=0.19.8,<0.20",
        "triton>=3.9,<3.10",  # TMA tensor descriptors; check_sm90's register limits were measured on 3.9
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "hydra-core>=1.3",
        "pyyaml>=6",  # the resolved config.yaml the trainer writes (also a dependency of hydra-core)
        "numpy>=1.24",
        "datasketch>=1.6",  # MinHash LSH for near-duplicate removal
        "safetensors>=0.4",  # Hugging Face weights: export, and lazy per-rank import (safe_open slices)
        "tokenizers>=0.20,<1",  # tokenizer.json in exports (AutoTokenizer gives floe's ids)
        "protobuf>=3.20",  # reading a SentencePiece model's spec (normaliser, pieces) for tokenizer.json
        "tqdm>=4.66",  # progress bars
        # data.paths in Parquet / Arrow / save_to_disk form and data.hf_dataset (floe/data/readers.py); 5.2 tested,
        # pyarrow comes with it
        "datasets>=3,<6",
        "matplotlib>=3.7,<4",  # tools/compare.py plots (tested with 3.11)
        # lora.quantize_base: NF4 (QLoRA's to_nf4) and int8 affine quantization, pure PyTorch on CPU and CUDA;
        # tested with 0.18.0, whose public names (torchao.quantization.to_nf4, quant_primitives) floe uses
        "torchao>=0.18,<0.19",
    ],
    extras_require={
        "tensorboard": ["tensorboard>=2.17,<3"],  # log.tensorboard=true (torch.utils.tensorboard); 2.21 tested
        "dev": [
            "pytest>=8", "pytest-timeout>=2.3",
            # tests load exports with AutoTokenizer and check CHAT_TEMPLATE with apply_chat_template; 5.25 tested
            "transformers>=4.45,<6",
            "tensorboard>=2.17,<3",  # the log.tensorboard test reads the events back
            # tests compare floe's DPO/SimPO losses with TRL's (private DPOTrainer._compute_loss and
            # CPOTrainer.cpo_loss, so the version tested: 1.16.0)
            "trl>=1.16,<1.17",
            # the LoRA tests' independent reference (PEFT's own LoRA layers) and the check that PEFT loads
            # floe's adapter export; 0.21.2 tested
            "peft>=0.21,<0.22",
        ],
    },
)
