"""Images in: manifests of a folder, CSV or Parquet; the byte-level format checks; decoding
(OpenCV, or nvJPEG on a GPU); preprocessing; the loader; the near-duplicate copies that
calibrate dedup; the demo data set. Knows nothing of models or outputs."""
