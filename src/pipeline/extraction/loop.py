"""The one extraction loop: an engine's batches, in dataset order, into the chunk writer."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm

from pipeline.extraction.forward import Forwarded
from pipeline.extraction.writer import ChunkWriter


def embed_batches(batches: Iterable[Forwarded], writer: ChunkWriter) -> None:
    """Hand every batch to `writer`, then stage the last chunk. Each batch is handed on one
    batch later, so on a GPU the next forward pass overlaps the copy of the previous batch's
    rows and their saving."""
    pending: Forwarded | None = None

    def hand_on(batch: Forwarded) -> None:
        writer.add(batch.indices, batch.on_host(), batch.failures)

    with tqdm(total=len(writer.ids), unit="img", desc="extract", mininterval=1.0) as progress:
        for batch in batches:
            if pending is not None:
                hand_on(pending)
            pending = batch
            progress.update(len(batch.indices) + len(batch.failures))
        if pending is not None:
            hand_on(pending)
    writer.save()
