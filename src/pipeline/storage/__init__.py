"""Outputs: the layer folder contract (parts, manifest, ledger), staging, the incremental
update plan, the atomic publish, and the checked read every downstream stage goes through.
Knows nothing of models or images' pixels."""
