"""python -m pipeline [overrides]: extract the configured layers' embeddings to Parquet."""

from pipeline.app import main
from pipeline.extract import run

if __name__ == "__main__":
    main("extract", run)
