"""The pipeline's Hydra configs: config.yaml and its groups.

The wheel ships this folder as the package `pipeline.conf` (pyproject.toml's package-dir), which
Hydra reads as `pkg://pipeline.conf`. This file makes it a regular package: Hydra's pkg:// wants
one, and an editable install cannot import a namespace package that package-dir maps elsewhere
(pypa/setuptools#4943).
"""
