"""Embeddings from any layer of any PyTorch image model, in one inference pass, to Parquet."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> object:
    """`from pipeline import embed, LayerHooks`, loaded on first use: importing the package
    (as Hydra's plugin scan and DVC do) stays light."""
    if name == "embed":
        from pipeline.api import embed

        return embed
    if name == "LayerHooks":
        from pipeline.extraction.hooks import LayerHooks

        return LayerHooks
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
