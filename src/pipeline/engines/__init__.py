"""Engines other than the local loop in `extract.py`. Each feeds the same `ChunkWriter`, so
chunking, resume, the coverage check, the publish and failures.parquet are one code path."""
