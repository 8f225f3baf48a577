"""python -m pipeline [overrides]: extract the configured layers' embeddings to Parquet."""

if __name__ == "__main__":
    from pipeline.cli import extract

    extract()
