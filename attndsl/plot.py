"""Mask and weight pictures as PNG files (matplotlib, the `plot` extra: pip install 'attndsl[plot]').

Both pictures read like the matrix: query rows down the left side (row 0 at the top), key
columns across the top. Figures are built with matplotlib's object API (no pyplot, no global
backend), at a fixed size in pixels so that a picture's size depends only on its shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
LABELLED = 40  # up to this many rows (or columns) a picture names every one; beyond, ticks


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("attndsl plot needs matplotlib: pip install 'attndsl[plot]'") from None
    return Figure


def figure_pixels(n_q: int, n_k: int, labelled: bool = False) -> tuple[int, int]:
    """(width, height) of a picture in pixels: the longer side 640 (800 with word labels), the
    other following the matrix's aspect but at least half of that."""
    side = 800 if labelled else 640
    aspect = min(max(n_q / n_k, 0.5), 2.0)
    width, height = (side, side * aspect) if aspect <= 1 else (side / aspect, side)
    return round(width), round(height) + 60  # room for the title and colour bar


def _figure(n_q: int, n_k: int, labelled: bool = False) -> Any:
    width, height = figure_pixels(n_q, n_k, labelled)
    return _matplotlib()(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _keys_on_top(ax: Any) -> None:
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()


def _labels(ax: Any, qlabels: Sequence[str] | None, klabels: Sequence[str] | None,
            shape: tuple[int, int]) -> None:
    """Word labels where given; else every position numbered when there are few."""
    n_q, n_k = shape
    if qlabels is None and n_q <= LABELLED:
        qlabels = [str(i) for i in range(n_q)]
    if klabels is None and n_k <= LABELLED:
        klabels = [str(j) for j in range(n_k)]
    if qlabels is not None:
        ax.set_yticks(range(len(qlabels)), labels=list(qlabels))
    if klabels is not None:
        long = max(map(len, klabels), default=0) > 2  # numbers stay upright
        ax.set_xticks(range(len(klabels)), labels=list(klabels), rotation=60 if long else 0,
                      ha="left" if long else "center", rotation_mode="anchor")


def _tile_grid(ax: Any, n_q: int, n_k: int, tile: tuple[int, int]) -> None:
    """Thin lines at the kernel's tile edges (cells are centred on integers: edges at -0.5)."""
    bq, bk = tile
    for i in range(bq, n_q, bq):
        ax.axhline(i - 0.5, color="tab:orange", linewidth=0.6)
    for j in range(bk, n_k, bk):
        ax.axvline(j - 0.5, color="tab:orange", linewidth=0.6)


def save_mask(allowed: np.ndarray, path: str | Path, title: str,
              tile: tuple[int, int] | None = None) -> Path:
    """allowed[i, j] as a picture: allowed pairs dark, masked ones light; the kernel's tiles
    outlined when `tile` (BQ, BK) is given and the picture holds more than one."""
    n_q, n_k = allowed.shape
    fig = _figure(n_q, n_k)
    ax = fig.add_subplot()
    ax.imshow(allowed, cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest", aspect="auto")
    if tile is not None and (n_q > tile[0] or n_k > tile[1]):
        _tile_grid(ax, n_q, n_k, tile)
    _keys_on_top(ax)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def save_weights(weights: np.ndarray, path: str | Path, title: str,
                 allowed: np.ndarray | None = None, qlabels: Sequence[str] | None = None,
                 klabels: Sequence[str] | None = None) -> Path:
    """The weights [n_q, n_k] as a heatmap; pairs the mask removes in light grey (and the
    title says so when there are any)."""
    n_q, n_k = weights.shape
    labelled = qlabels is not None or klabels is not None
    fig = _figure(n_q, n_k, labelled)
    ax = fig.add_subplot()
    shown = np.ma.masked_where(~allowed, weights) if allowed is not None else weights
    if allowed is not None and not allowed.all():
        title += "; grey: masked"
    cmap = _matplotlib_colormap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(shown, cmap=cmap, vmin=0, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="weight")
    _keys_on_top(ax)
    _labels(ax, qlabels, klabels, weights.shape)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _matplotlib_colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def words(text: str | None) -> list[str] | None:
    """--labels "I love you" -> ["I", "love", "you"]."""
    return text.split() if text is not None else None

