"""Embeddings from any layer of any PyTorch image model, in one inference pass, to Parquet."""

import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def _plain_progress_bars_in_notebooks() -> None:
    """In Jupyter, huggingface_hub (which timm imports) makes its bars with tqdm.auto, which on
    import warns "IProgress not found" where ipywidgets is not installed, then falls back to
    tqdm's plain bars. Imported here first with that warning silenced, it gives the same plain
    bars without it (the pipeline's own bars are tqdm's plain ones everywhere). Outside IPython
    nothing is imported: the package stays light."""
    if "IPython" not in sys.modules or "tqdm.auto" in sys.modules:
        return
    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "IProgress not found", TqdmWarning)
        import tqdm.auto  # noqa: F401


_plain_progress_bars_in_notebooks()


def __getattr__(name: str) -> object:
    """`from pipeline import embed, LayerHooks, clear_model_cache`, loaded on first use:
    importing the package (as Hydra's plugin scan and DVC do) stays light."""
    if name in ("embed", "clear_model_cache"):
        from pipeline import api

        return getattr(api, name)
    if name == "LayerHooks":
        from pipeline.extraction.hooks import LayerHooks

        return LayerHooks
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
