"""A trailing moving median: a trend line that one outlier cannot drag away (display only)."""

from __future__ import annotations

import numpy as np

#: rows of the sliding window handled at once (bounds the memory to CHUNK x window floats)
CHUNK = 4096


def moving_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of the last ``window`` finite values at each point (NaN where none is finite)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0 or window <= 1:
        return v.copy()
    padded = np.concatenate([np.full(window - 1, np.nan), v])
    view = np.lib.stride_tricks.sliding_window_view(padded, window)
    out = np.empty(n)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: NaN, as documented
        for at in range(0, n, CHUNK):
            out[at:at + CHUNK] = np.nanmedian(view[at:at + CHUNK], axis=1)
    return out
