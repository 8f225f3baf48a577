"""Embeddings from any layer of any PyTorch image model, in one inference pass, to Parquet."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
