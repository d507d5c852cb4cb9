"""rlt_jax: Reinforcement-Learned Teachers in JAX/Flax."""
from setuptools import find_packages, setup

# Pinned: the combination below is the one CI installs and tests (see README).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "jinja2==3.1.6",  # apply_chat_template needs it; transformers only pulls it in with torch
    "numpy>=2.0,<3",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "datasets==5.2.0",  # Hugging Face datasets folders (load_from_disk)
    "pyarrow==26.0.1",  # parquet sources
    "array-record==0.8.6",  # TFDS array_record sources
    "tensorboard==2.21.0",  # event files for TensorBoard (no TensorFlow needed)
    "math-verify==0.9.0",  # answer equivalence in rlt_jax.grading
    "matplotlib==3.11.2",  # rlt_jax.plot
    "fsspec==2026.9.0",  # gs:// (and other URL) paths: rlt_jax.storage
    "gcsfs==2026.10.1",
    "etils[epath]==1.15.0",  # orbax's paths (a gs:// checkpoint directory)
    "tensorstore==0.1.86",  # orbax's array writes, straight to gs://
]

EXTRAS = {
    # torch is the oracle for the model tests and the peer in bench/; 2.13.0 is the CPU wheel.
    "test": ["pytest==8.4.2", "torch==2.13.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
             "wandb==0.31.0",
             "gcp-storage-emulator==2026.7.19", "google-cloud-storage==3.17.2"],  # the local GCS of tests/conftest.py
    # W&B logging (config.wandb.project); tested in wandb's offline mode.
    "wandb": ["wandb==0.31.0"],
}

setup(
    name="rlt_jax",
    version="0.1.0",
    description="Reinforcement-Learned Teachers (RLT) in JAX/Flax",
    packages=find_packages(include=["rlt_jax", "rlt_jax.*"]),
    package_data={"rlt_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
