"""Hydra scans the `hydra_plugins` namespace in every process that uses it, importing what it
finds: this registers the pipeline's config resolvers there too, so tools that compose the
config themselves (DVC's `dvc exp run`, which writes params.yaml) resolve it as the apps do."""

from pipeline.app import register_resolvers

register_resolvers()
