"""The docs never hand a user a fixed dedup threshold as if it were a cosine similarity: with
whitening on (the default) similarities run far lower, and such a number finds few of the
duplicates. A number in a command goes with `dedup.whiten=false`; otherwise the threshold is the
calibrated one (`dedup.threshold=auto`, `dedup.target_precision`), or the one a person's review
suggests (`dedup.reviewed`: "dedup.threshold=0.41 keeps precision >= 0.95 on your 120 reviewed
pairs", a number measured on their own pairs)."""

from __future__ import annotations

import re

from conftest import REPO

FIXED = re.compile(r"dedup\.threshold=\d")


def test_no_page_suggests_a_fixed_threshold_for_whitened_embeddings() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    found = [
        f"{page.relative_to(REPO)}:{number}: {line.strip()}"
        for page in pages
        for number, line in enumerate(page.read_text().splitlines(), start=1)
        if FIXED.search(line) and "whiten=false" not in line and "reviewed pairs" not in line
    ]
    assert not found, "\n".join(found)
