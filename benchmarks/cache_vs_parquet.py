"""Issue 22 item 2: would a Parquet sidecar beat the run log's pickle cache?

On a 100,000-step synthetic log (every quantity), times, medians of ``--rounds`` interleaved rounds:
- ``cache``: a warm ``cockpit_lite.load`` plus ``Run.series`` of every total key (through the pickle cache,
  which is valid only while the log's first bytes hash to its SHA-1 digest);
- ``parquet``: reading the same columns from a Parquet file (pyarrow);
- ``sha1``: SHA-1 of the whole log: the validity rule a Parquet sidecar would keep too.
Needs pyarrow, which cockpit-lite does not depend on (``pip install pyarrow``, or
``pip install --target DIR pyarrow`` and ``PYARROW_DIR=DIR``).

    python benchmarks/cache_vs_parquet.py [--steps 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sha1(path: str) -> float:
    t = time.perf_counter()
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--logdir", default=os.path.join(tempfile.gettempdir(), "cockpit-cache-vs-parquet"))
    args = p.parse_args(argv)
    if os.environ.get("PYARROW_DIR"):
        sys.path.insert(0, os.environ["PYARROW_DIR"])
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import cockpit_lite
    from cockpit_lite.testing import write_synthetic_log

    log = os.path.join(args.logdir, "cockpit.jsonl")
    if not os.path.exists(log):
        write_synthetic_log(args.logdir, args.steps, hist_every=100, curvature_every=10)
    run = cockpit_lite.load(args.logdir)  # decodes the log once and writes the cache
    keys = [k for k in run.keys() if "/" not in k]
    steps = np.arange(args.steps + 1)
    columns = {"step": steps}
    for k in keys:
        s, v = run.series(k)
        full = np.full(len(steps), np.nan)
        full[np.asarray(s, dtype=int)] = v
        columns[k] = full
    parquet_path = os.path.join(args.logdir, "columns.parquet")
    pq.write_table(pa.table(columns), parquet_path)

    def cache() -> float:
        t = time.perf_counter()
        r = cockpit_lite.load(args.logdir)
        for k in keys:
            r.series(k)
        return time.perf_counter() - t

    def parquet() -> float:
        t = time.perf_counter()
        table = pq.read_table(parquet_path)
        for k in keys:
            table[k].to_numpy()
        return time.perf_counter() - t

    times = {"cache": [], "parquet": [], "sha1": []}
    for _ in range(args.rounds):
        times["cache"].append(cache())
        times["parquet"].append(parquet())
        times["sha1"].append(_sha1(log))
    cache_file = os.path.join(args.logdir, ".cockpit.jsonl.cache")
    result = {"steps": args.steps, "columns": len(keys), "log_mb": round(os.path.getsize(log) / 1e6, 1),
              "cache_mb": round(os.path.getsize(cache_file) / 1e6, 1) if os.path.exists(cache_file) else None,
              "parquet_mb": round(os.path.getsize(parquet_path) / 1e6, 1),
              **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
