"""Installs moe_adapt: `pip install -e .` (runtime); `pip install -e ".[test]"` adds tests."""

import setuptools

INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  # Paths of workdirs, checkpoints and caches (local or gs://); [epath] brings fsspec.
  "etils[epath]==1.15.0",
  "chex==0.1.92",
  "ml-collections==1.1.0",
  "tensorflow-datasets==4.9.10",
  "scikit-learn==1.9.1",
  "tqdm==4.70.1",
  "matplotlib==3.11.2",
  "absl-py==2.5.1",
  "numpy==2.4.6",
  "safetensors==0.8.0",
  "tokenizers==0.23.3",
  # Streaming input (moe_adapt.data.streaming) over TFDS array_record.
  "grain==0.2.18",
]

TEST_REQUIRES = [
  "pytest==9.2.0",
  # Runs the suite on both CPU cores (`-n 2`, README).
  "pytest-xdist==3.8.0",
  "hypothesis==6.170.15",
  "ruff==0.17.6",
]

# Remote workdirs on Google Cloud Storage (--workdir=gs://bucket/dir): epath's gs://
# backend when TensorFlow is not installed.
GCS_REQUIRES = [
  "gcsfs==2026.10.1",
]

# The API reference (docs/build_api.sh); part of `test` because CI builds it.
DOCS_REQUIRES = [
  "sphinx==9.0.4",
]

setuptools.setup(
  name="moe_adapt",
  version="0.1.0",
  description=("Adapting models to new domains and tasks by reusing several experts, in JAX/Flax."),
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="MIT",
  python_requires=">=3.11",
  # `configs` ships with the library: config files import their shared pieces from it
  # (`from configs import _shared`), wherever `moe-adapt` is started.
  packages=setuptools.find_packages(include=["moe_adapt", "moe_adapt.*", "configs", "configs.*"]),
  install_requires=INSTALL_REQUIRES,
  extras_require={
    "test": TEST_REQUIRES + DOCS_REQUIRES,
    "docs": DOCS_REQUIRES,
    "gcs": GCS_REQUIRES,
  },
  entry_points={
    "console_scripts": [
      "moe-adapt=moe_adapt.main:entry_point",
      "moe-adapt-data=moe_adapt.data.cli:entry_point",
      "moe-adapt-merge=moe_adapt.merge_cli:entry_point",
    ],
  },
)
