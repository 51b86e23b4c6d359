"""Installs coyo_vit: the library (coyo_vit), the tf.data input pipeline and the checkpoint tools."""
from setuptools import find_packages, setup

setup(
    name="coyo_vit",
    version="0.1.0",
    description="Pretrain, fine-tune, import/export and evaluate Vision Transformers on COYO-Labeled-300M with JAX/Flax.",
    python_requires=">=3.10",
    packages=find_packages(include=["coyo_vit", "coyo_vit.*", "input_pipeline", "input_pipeline.*",
                                    "checkpoints", "checkpoints.*", "configs"]),
    package_data={"coyo_vit": ["data/*.tsv", "data/*.json"]},
    install_requires=[
        # jax: lower bound for jax.set_mesh (exposed in 0.7.1), used by the train loop and
        # evaluate.py; no upper bound so GPU/TPU hosts can install the jax[cuda12|cuda13|tpu]
        # they need.
        "jax>=0.7.1",
        "flax>=0.10.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "importlib_resources",  # tensorflow-datasets' download_and_prepare needs it via etils
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "pyarrow>=14", "pillow>=9", "scikit-learn>=1.3", "matplotlib>=3.7", "psutil>=5.9"],
        "demo": ["scikit-learn>=1.3"],  # the fine-tuning demo writes sklearn's digits as an image folder
        "plots": ["matplotlib>=3.7"],   # PNGs of data statistics and sweep curves
        "data": ["pyarrow>=14", "pillow>=9", "matplotlib>=3.7"],  # metadata parquet tools
        # transformers / timm export and import (checkpoints.pytorch_io needs only safetensors; the
        # tests load the exported folders in the real libraries). CPU-only torch keeps it small:
        # pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu first.
        "torch": ["safetensors>=0.4", "torch>=2.1", "transformers>=4.40", "timm>=1.0"],
    },
)
