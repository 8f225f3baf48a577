"""The pipeline's Hydra configs, shipped inside the package: config.yaml and its groups."""
