"""python -m pipeline [overrides]: extract the configured layers' embeddings to Parquet."""

from pipeline.app import main, sleeping_openmp

if __name__ == "__main__":
    sleeping_openmp()  # before torch loads
    from pipeline.extract import run

    main("extract", run)
