"""sentcomp: why language models help downstream tasks (Saunshi, Malladi, Arora, ICLR 2021), in JAX/Flax."""

from setuptools import find_packages, setup

# Versions known to install and work together (../shared/ASSETS.md, checked 2026-11).
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "transformers==5.23.0",  # tokenizers, configs and hub downloads only: no models are used from it
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",
    "gguf==0.19.0",
    "scikit-learn==1.9.1",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",  # training metrics as TensorBoard event files (sentcomp.training); needs no TensorFlow
]
TFDS = ["tensorflow-datasets==4.9.10"]
HUB = ["pyarrow==26.0.1"]  # Parquet files of Hugging Face Hub datasets (sentcomp.data.hub); JSON lines need nothing
# lm-evaluation-harness (sentcomp.lmeval, the only importer of lm_eval): its HF backend imports accelerate
LMEVAL = ["lm-eval==0.4.13", "accelerate==1.16.0", "datasets==5.2.0"]
TEST = ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "scipy==1.17.1", "ruff==0.17.6", "mypy==2.4.1"]

setup(
    name="sentcomp",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["sentcomp", "sentcomp.*"]),
    install_requires=CORE,
    extras_require={"tfds": TFDS, "hub": HUB, "lmeval": LMEVAL, "test": TEST + TFDS + HUB + LMEVAL},
)
