"""Repeated-row detection: preprocess's row hashing against pandas' `DataFrame.duplicated`, side by side.

    .venv/bin/python bench/bench_dedup.py                     # 1M and 3M rows, 32 columns, 10% repeats
    .venv/bin/python bench/bench_dedup.py --rows 1000000,10000000 --repeats 3

Each size builds one frame (normal values rounded to 0.1, plus a tenth of its
rows repeated at the end), checks that both methods mark exactly the same rows,
and prints the median seconds of each, their ratio, and the growth from the
smallest size (10x the rows is linear at 10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.preprocess.logic import repeated_rows


def frame_of(rows: int, columns: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, columns)).round(1))
    return pd.concat([frame, frame.iloc[: rows // 10]], ignore_index=True)


def timed(method, frame: pd.DataFrame, repeats: int) -> tuple[float, np.ndarray]:
    seconds, marked = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        marked = method(frame)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), marked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1000000,3000000", help="comma-separated row counts")
    parser.add_argument("--columns", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    print("| rows | hashing s | pandas duplicated s | ratio | hashing growth | pandas growth |")
    print("|---:|---:|---:|---:|---:|---:|")
    first: tuple[float, float] | None = None
    for rows in sizes:
        frame = frame_of(rows, args.columns)
        hashed, ours = timed(repeated_rows, frame, args.repeats)
        exact, theirs = timed(lambda f: f.duplicated().to_numpy(), frame, args.repeats)
        assert (ours == theirs).all(), "the two methods disagree"
        first = first or (hashed, exact)
        print(
            f"| {rows:,} | {hashed:.2f} | {exact:.2f} | {hashed / exact:.2f} | {hashed / first[0]:.1f}x "
            f"| {exact / first[1]:.1f}x |"
        )
        del frame


if __name__ == "__main__":
    main()
