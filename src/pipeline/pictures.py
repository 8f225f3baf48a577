"""Pictures made of the images themselves: the contact sheet of the clusters, the near-duplicate
pairs on both sides of the threshold, and a layer's feature maps over its input.

Sheets of thumbnails are laid out by hand, in inches from the top-left corner (`Layout`), so a
thumbnail is the same size however many there are and the figure's shape follows what it
holds. Each thumbnail's axes carries its file as its gid (`Axes.get_gid`) and its part of the
picture as its label ("central", "random", "a", "b"), so what a figure shows can be read back
from it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch
from matplotlib.text import Text

from pipeline import plots
from pipeline.images.formats import ImageError
from pipeline.images.thumbnails import thumbnail_rgb

MARGIN = 0.3  # inches around a sheet
CAPTION = 22  # characters of a file name under a thumbnail, beyond which it is cut in the middle
OVERLAY_CHANNELS = 3  # the strongest channels whose mean the feature-map overlay shows


@dataclass(frozen=True)
class Shown:
    """One thumbnail: its file and the caption under it (`colour`: one that stands out)."""

    path: Path
    caption: str
    colour: str = "black"


def thumbnail(path: Path, size: int = 128) -> np.ndarray | None:
    """An RGB copy of an image file `size` pixels on its longer side, or None where it cannot
    be read (or the extraction would refuse it: `images.thumbnails`)."""
    try:
        image = thumbnail_rgb(path, size)
    except (OSError, ImageError):
        return None
    scale = size / max(image.shape[:2])
    if scale > 1:  # a small image, grown to fill its box
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return image


def short(name: str, length: int = CAPTION) -> str:
    """A file name cut in the middle to `length` characters: its start and end both show."""
    return (
        name if len(name) <= length else f"{name[: length // 2 - 1]}..{name[-(length // 2 - 1) :]}"
    )


class Layout:
    """A figure of a fixed size in inches, its parts placed from the top-left corner."""

    def __init__(self, width: float, height: float) -> None:
        self.width, self.height = width, height
        self.figure = plots.figure(figsize=(width, height))

    def box(self, x: float, y: float, w: float, h: float) -> list[float]:
        """[left, bottom, width, height] in figure fractions for a box at (x, y) inches."""
        return [x / self.width, 1 - (y + h) / self.height, w / self.width, h / self.height]

    def text(self, x: float, y: float, text: str, **kwargs: object) -> Text:
        return self.figure.text(x / self.width, 1 - y / self.height, text, **kwargs)

    def line(self, xs: tuple[float, float], ys: tuple[float, float], **kwargs: object) -> Line2D:
        line = Line2D(
            [x / self.width for x in xs],
            [1 - y / self.height for y in ys],
            transform=self.figure.transFigure,
            **kwargs,
        )
        self.figure.add_artist(line)
        return line

    def card(self, x: float, y: float, w: float, h: float) -> FancyBboxPatch:
        """A light grey box under what is drawn there."""
        left, bottom, width, height = self.box(x, y, w, h)
        card = FancyBboxPatch(
            (left, bottom),
            width,
            height,
            boxstyle="round,pad=0,rounding_size=0.004",
            transform=self.figure.transFigure,
            facecolor="0.95",
            edgecolor="none",
            zorder=-1,
        )
        self.figure.add_artist(card)
        return card

    def thumbnail(self, shown: Shown, x: float, y: float, side: float, part: str) -> Axes:
        """The image in a `side`-inch square at (x, y), its caption under it."""
        ax = self.figure.add_axes(self.box(x, y, side, side), label=part)
        ax.set_gid(str(shown.path))
        ax.set_xticks([]), ax.set_yticks([])
        ax.spines[:].set_color("0.85")
        picture = thumbnail(shown.path, round(side * plots.DPI))
        if picture is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=6, color="grey")
        else:
            ax.imshow(picture)
            ax.spines[:].set_visible(False)
        self.text(
            x + side / 2,
            y + side + 0.03,
            shown.caption,
            ha="center",
            va="top",
            fontsize=6,
            color=shown.colour,
            linespacing=1.1,
        )
        return ax


# --- the contact sheet --------------------------------------------------------------------------


@dataclass(frozen=True)
class SheetRow:
    """One cluster's row: its heading, the images nearest its centre, a random few of it."""

    heading: str
    central: Sequence[Shown]
    random: Sequence[Shown]


SHEET_THUMB = 1.0  # inches (DPI pixels)


class SheetCluster(Protocol):
    """What the contact sheet needs of a cluster (cluster.py's `SheetCluster`): its number,
    its rows, and which of them to show."""

    number: int
    members: np.ndarray
    central: np.ndarray
    random: np.ndarray


def majority(labels: Sequence[str | None]) -> tuple[str, int, int] | None:
    """The most common label (the first seen of those as common), how many have it, and how
    many have a label; None where none has."""
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return None
    label, count = counts.most_common(1)[0]
    return label, count, counts.total()


def cluster_sheet(
    clusters: Sequence[SheetCluster],
    ids: Sequence[str],
    labels: Sequence[str | None] | None,
    root: Path,
    title: str,
) -> Figure:
    """The contact sheet of `clusters`: each row headed by the cluster's size and its majority
    label with that label's share, each image captioned with its file name and its label (in
    red where it is not the majority's)."""
    rows = []
    for cluster in clusters:
        size = len(cluster.members)
        heading = f"cluster {cluster.number}: {size:,} image{'s' if size != 1 else ''}"
        common = majority([labels[i] for i in cluster.members]) if labels else None
        if common is not None:
            label, count, labelled = common
            of = f"{count} of {labelled}" + (" labelled" if labelled < size else "")
            heading += f"; majority label {label!r}: {count / labelled:.0%} ({of})"
        elif labels:
            heading += "; no labels"

        def shown(row: int, common: tuple | None = common) -> Shown:
            path = root / ids[row]
            if not labels:
                return Shown(path, short(ids[row]))
            label = labels[row]
            colour = "black" if common is not None and label == common[0] else "firebrick"
            return Shown(path, f"{short(ids[row])}\n{label or '(no label)'}", colour)

        rows.append(
            SheetRow(
                heading, [shown(i) for i in cluster.central], [shown(i) for i in cluster.random]
            )
        )
    return contact_sheet_figure(rows, title)


def contact_sheet_figure(rows: Sequence[SheetRow], title: str) -> Figure:
    """A row per cluster, its heading above: on the left of a thin line the images nearest the
    cluster's centre (nearest first), on the right a random sample of the rest."""
    side, gap, split = SHEET_THUMB, 0.08, 0.36
    central = max([1, *(len(r.central) for r in rows)])
    drawn = max([0, *(len(r.random) for r in rows)])
    right = MARGIN + central * (side + gap) - gap + split  # where the random half starts
    width = max(right + drawn * (side + gap) - gap + MARGIN, text_width(title) + 2 * MARGIN)
    top = 0.25 + 0.17 * (title.count("\n") + 1)
    row_height = 0.4 + side + 0.3 + 0.14
    layout = Layout(max(width, 6.0), top + row_height * max(1, len(rows)) + 0.1)
    layout.text(MARGIN, 0.15, title, va="top", fontsize=9)
    if not rows:
        layout.text(MARGIN, top + 0.2, "no clusters to show: every image is noise", fontsize=9)
    halves = (("nearest the centre", MARGIN, "central"), ("random sample", right, "random"))
    for r, row in enumerate(rows):
        y = top + r * row_height
        layout.text(MARGIN, y, row.heading, va="top", fontsize=8, weight="bold", gid="row-title")
        parts = zip(halves, (row.central, row.random), strict=True)
        for (what, x, part), images in list(parts)[: 1 + (drawn > 0)]:
            layout.text(x, y + 0.22, what, va="top", fontsize=6.5, style="italic", color="0.35")
            for i, image in enumerate(images):
                layout.thumbnail(image, x + i * (side + gap), y + 0.4, side, part)
        if drawn and not row.random:
            layout.text(right, y + 0.4 + side / 2, "(no other images)", fontsize=6.5, color="0.5")
        if drawn:
            x = right - split / 2 - gap / 2
            layout.line(
                (x, x), (y + 0.22, y + 0.4 + side + 0.25), color="0.6", lw=0.8, gid="separator"
            )
        layout.line((MARGIN, layout.width - MARGIN), (y + row_height - 0.07,) * 2, color="0.9")
    return layout.figure


def text_width(text: str, size: float = 9) -> float:
    """About how many inches the longest line of `text` takes at `size` points."""
    return max(len(line) for line in text.splitlines()) * size * 0.52 / 72


# --- near-duplicate pairs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    a: Shown
    b: Shown
    similarity: float


PAIR_THUMB = 128 / plots.DPI  # inches: 128 pixels
PAIR_ASPECT = 1.5  # the width / height the number of columns aims at


def pairs_figure(
    above: Sequence[Pair], below: Sequence[Pair], threshold: float, title: str
) -> Figure:
    """The pairs at or above the threshold, then a red line at the threshold, then those below
    it: each pair its two images and their similarity, most similar first, in reading order
    over as many columns as give the figure a width about PAIR_ASPECT times its height."""
    side, gap = PAIR_THUMB, 0.06
    cell = 2 * side + gap + 0.62  # the pair and its similarity
    between, row_height, heading = 0.35, side + 0.22 + 0.18, 0.32
    top = 0.25 + 0.17 * (title.count("\n") + 1)

    def size(columns: int) -> tuple[float, float]:
        rows = sum(max(1, math.ceil(len(p) / columns)) for p in (above, below))
        width = 2 * MARGIN + columns * cell + (columns - 1) * between
        return width, top + 2 * heading + rows * row_height + 0.5 + 0.1

    most = max(1, len(above), len(below))
    columns = min(
        range(1, min(most, 8) + 1),
        key=lambda c: abs(math.log(size(c)[0] / size(c)[1] / PAIR_ASPECT)),
    )
    width, height = size(columns)
    layout = Layout(max(width, 5.0), height)
    layout.text(MARGIN, 0.15, title, va="top", fontsize=9)
    y = top
    for block, (pairs, words) in enumerate(
        (
            (above, f"at or above the threshold: kept as near-duplicates ({len(above)} shown)"),
            (below, f"below the threshold: not kept ({len(below)} shown)"),
        )
    ):
        if block:  # the threshold, between the last pair above and the first below
            line_y = y + 0.2
            layout.line(
                (MARGIN, layout.width - MARGIN),
                (line_y, line_y),
                color="tab:red",
                lw=2.2,
                gid="threshold",
            )
            layout.text(
                layout.width / 2,
                line_y,
                f"threshold {threshold:.3f}",
                ha="center",
                va="center",
                fontsize=9,
                color="tab:red",
                weight="bold",
                gid="threshold",
                bbox={"facecolor": "white", "edgecolor": "tab:red"},
            )
            y += 0.5
        layout.text(
            MARGIN,
            y + 0.05,
            words if pairs else words.split(":")[0] + ": none",
            va="top",
            fontsize=7.5,
            style="italic",
            color="0.3",
        )
        y += heading
        for i, pair in enumerate(pairs):
            x = MARGIN + (i % columns) * (cell + between)
            row_y = y + (i // columns) * row_height
            layout.card(x - 0.05, row_y - 0.05, cell, side + 0.3)  # the pair's own ground
            layout.thumbnail(pair.a, x, row_y, side, "a")
            layout.thumbnail(pair.b, x + side + gap, row_y, side, "b")
            layout.text(
                x + 2 * side + gap + 0.08,
                row_y + side / 2,
                f"{pair.similarity:.3f}",
                va="center",
                fontsize=9,
                gid="similarity",
                color="darkgreen" if pair.similarity >= threshold else "0.35",
            )
        y += max(1, math.ceil(len(pairs) / columns)) * row_height
    return layout.figure


# --- feature maps -------------------------------------------------------------------------------


def feature_figure(
    picture: np.ndarray, maps: np.ndarray, channels: list[int], title: str, normalise: str
) -> Figure:
    """On the left the input as the model saw it and, under it, the mean of the
    OVERLAY_CHANNELS strongest channels' maps upsampled to it and blended over it; on the
    right the maps of `channels` with their colour scale: each map's own range
    (`normalise="channel"`, each shown from 0 at its minimum to 1 at its maximum, the range in
    its title) or one range for the layer ("layer", the activations as they are)."""
    columns = math.ceil(math.sqrt(len(channels)))
    rows = math.ceil(len(channels) / columns)
    figure = plots.figure(
        figsize=(3.2 + 1.7 * columns + 0.9, max(5.6, 1.75 * rows + 0.6)), layout="constrained"
    )
    left, right = figure.subfigures(1, 2, width_ratios=[3.2, 1.7 * columns + 0.9])
    source, overlay = left.subplots(2, 1)
    for ax in (source, overlay):
        ax.set_axis_off()
    source.imshow(picture)
    source.set_title("input", fontsize=8)
    strongest = channels[:OVERLAY_CHANNELS]
    heat = scaled(maps[strongest].mean(axis=0))
    heat = np.clip(cv2.resize(heat, picture.shape[1::-1], interpolation=cv2.INTER_CUBIC), 0, 1)
    overlay.imshow(picture)
    blended = overlay.imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.25 + 0.6 * heat)
    blended.set_gid("overlay")
    overlay.set_title(
        f"channels {', '.join(map(str, strongest))} (mean)\nover the input", fontsize=8
    )
    scale = left.colorbar(blended, ax=overlay, orientation="horizontal", shrink=0.8, pad=0.02)
    scale.set_label("the mean map: 0 at its minimum, 1 at its maximum", fontsize=7)
    scale.ax.tick_params(labelsize=6)
    grid = right.subplots(rows, columns, squeeze=False)
    for ax in grid.flat:
        ax.set_axis_off()
    low, high = float(maps[channels].min()), float(maps[channels].max())
    shown = None
    for ax, channel in zip(grid.flat, channels, strict=False):
        image = maps[channel]
        if normalise == "channel":
            ax.set_title(f"channel {channel}\n{image.min():.3g} to {image.max():.3g}", fontsize=6.5)
            shown = ax.imshow(scaled(image), cmap="viridis", vmin=0, vmax=1)
        else:
            ax.set_title(f"channel {channel}", fontsize=7)
            shown = ax.imshow(image, cmap="viridis", vmin=low, vmax=high if high > low else low + 1)
    if shown is not None:
        label = (
            "activation, each map from its minimum (0) to its maximum (1)"
            if normalise == "channel"
            else "activation (one scale for the layer)"
        )
        scale = right.colorbar(shown, ax=grid, shrink=0.7)
        scale.set_label(label, fontsize=8)
        scale.ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=9)
    return figure


def scaled(values: np.ndarray) -> np.ndarray:
    """`values` from 0 at their minimum to 1 at their maximum (all 0 where they are flat)."""
    values = values.astype(np.float32)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)
