"""Vectors after extraction: normalising and whitening, nearest-neighbour search (exact or
faiss), and calibrating a duplicate threshold. Pure numpy/faiss: no files, no models."""
