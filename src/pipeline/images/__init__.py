"""Images in: manifests of a folder, CSV or Parquet (`manifest`); the byte-level format checks
(`formats`); decoding (`decode`: OpenCV, or `gpu_decode`: nvJPEG on a GPU); preprocessing
(`preprocess`); the loader (`loader`); the near-duplicate copies that calibrate dedup
(`augment`); the demo data set (`demo`). Knows nothing of models or outputs."""
