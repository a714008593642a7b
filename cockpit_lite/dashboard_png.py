"""Rendering a large dashboard to PNG on two cores.

Most of the time of ``cockpit-lite plot`` on a long run is matplotlib rasterizing the panels (tick
creation, text layout, glyphs): about 2.4 s for the 19 panels of a full dashboard on this 2-core
machine, while the second core idles. Here the figure (every artist already created) is
rasterized in two halves at once: a forked child draws the panels of the lower half with the upper
ones hidden, the parent the upper half with the lower ones hidden, and the parent stacks the two
images at the row boundary (every panel lies within its own row; the backgrounds and group titles
drawn in both are identical). The PNG is then written as matplotlib's own ``print_png`` writes
it (``matplotlib.image.imsave`` of the RGBA buffer). ``tests/instruments/test_dashboard_png.py`` checks that
the image equals the one drawn in one process, pixel for pixel.

Used only where it can pay and cannot go wrong: by the ``cockpit-lite plot`` command (a process of
its own; never inside a training process or the live renderer, whose threads a fork would copy in
whatever state they are), for a PNG, where ``os.fork`` exists (Linux, macOS) and there is more than
one core, with enough panels. Anything unexpected in the child (an error, a short image) and the
figure is drawn in one process as usual.
"""

from __future__ import annotations

import os
import warnings
from typing import BinaryIO, List, Optional

#: below this many panels one process is as quick (forking and copying the image cost ~0.1 s)
MIN_PANELS = 8


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def usable(fig) -> bool:
    """Whether ``fig`` is drawn in two halves here."""
    return hasattr(os, "fork") and _cores() > 1 and len(fig.axes) >= MIN_PANELS


def _center(ax) -> float:
    box = ax.get_position()
    return (box.y0 + box.y1) / 2


def _split(fig) -> Optional[float]:
    """The figure-fraction height at which to cut ``fig`` into two halves with about as many
    axes each: the bottom of one of its panel rows (``fig.cockpit_rows``, as the dashboard lays
    them out: every panel's axes, titles and labels lie within its row). None if there is none."""
    rows = getattr(fig, "cockpit_rows", None)
    if not rows or len(rows) < 2:
        return None
    centers = [_center(ax) for ax in fig.axes]
    best = None
    for bottom, _ in rows[:-1]:
        above = sum(c > bottom for c in centers)
        balance = abs(2 * above - len(centers))
        if best is None or balance < best[0]:
            best = (balance, bottom)
    return best[1]


def _draw_only(fig, keep) -> bytes:
    """RGBA bytes of ``fig`` drawn with only the axes for which ``keep(ax)`` holds visible."""
    hidden: List = [ax for ax in fig.axes if not keep(ax) and ax.get_visible()]
    for ax in hidden:
        ax.set_visible(False)
    try:
        fig.canvas.draw()
        return bytes(fig.canvas.buffer_rgba())
    finally:
        for ax in hidden:
            ax.set_visible(True)


def _own_fonts() -> None:
    """In the child: forget every font object inherited from the parent. A FreeType font reads its
    glyphs from its file on demand, through a file descriptor that parent and child share, offset
    included: both reading at once mix their reads ("invalid outline"). matplotlib forgets its
    font cache in a forked child itself; mathtext's cache of laid-out formulas (log-axis tick
    labels) holds fonts too."""
    from matplotlib import font_manager, mathtext

    for cached in (getattr(font_manager, "_get_font", None), getattr(mathtext.MathTextParser, "_parse_cached", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _read_all(fd: int, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_png(fig, fh: BinaryIO, dpi: float) -> bool:
    """Write ``fig`` as a PNG into ``fh``, its two halves drawn at once; False (nothing written)
    where that cannot be done, so that the caller saves the figure as usual."""
    import numpy as np
    from matplotlib import image

    cut = _split(fig)
    if cut is None:
        return False
    original_dpi = fig.dpi
    fig.set_dpi(dpi)
    try:
        width, height = fig.canvas.get_width_height(physical=True)
        size = width * height * 4
        upper = lambda ax: _center(ax) > cut  # noqa: E731
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: forking with threads
            pid = os.fork()
        if pid == 0:  # the child: the lower half, sent whole, then gone without running any cleanup
            status = 1
            try:
                os.close(read_fd)
                _own_fonts()
                pixels = _draw_only(fig, lambda ax: not upper(ax))
                view = memoryview(pixels)
                while view:
                    view = view[os.write(write_fd, view):]
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        try:
            top = _draw_only(fig, upper)
            bottom = _read_all(read_fd, size)
        finally:
            os.close(read_fd)
            _, status = os.waitpid(pid, 0)
        if status != 0 or len(bottom) != size or len(top) != size:
            return False
        rows = height - int(round(cut * height))  # pixel rows above the cut (image rows run downwards)
        stacked = np.frombuffer(top, dtype=np.uint8).reshape(height, width, 4).copy()
        stacked[rows:] = np.frombuffer(bottom, dtype=np.uint8).reshape(height, width, 4)[rows:]
        image.imsave(fh, stacked, format="png", origin="upper", dpi=dpi)
        return True
    finally:
        fig.set_dpi(original_dpi)
