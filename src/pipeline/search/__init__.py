"""Vectors after extraction: normalising and whitening, nearest-neighbour search (exact or
faiss), calibrating a duplicate threshold, and scoring pairs against true groups. Pure
numpy/faiss: no files, no models."""
