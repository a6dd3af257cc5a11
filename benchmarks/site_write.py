"""Cost of writing one site file, as an encoder actor does for every site it finishes: the per-cell
table (``site_table``) written as Parquet with its provenance, with the table converted to Arrow by
``arrow_table`` (a dtype block at a time) and by ``pa.Table.from_pandas`` (a column at a time).

Prints one JSON document. Usage:
    python benchmarks/site_write.py [--cells 5] [--channels 3] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=5, help="cells per site (BBBC021 sites of the pipeline "
                                                          "benchmark hold about 5)")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    from microsnoop_ray.encode.embed import feature_names
    from microsnoop_ray.io.write import arrow_table, write_parquet
    from microsnoop_ray.io.sources import SiteKey
    from microsnoop_ray.pipeline.layout import site_table

    channels = [f"ch{i}" for i in range(args.channels)]
    rng = np.random.default_rng(0)
    feats = pd.DataFrame(rng.random((args.cells, len(feature_names(channels))), dtype=np.float32),
                         columns=feature_names(channels))
    cells = pd.concat([pd.DataFrame({"Metadata_ObjectNumber": np.arange(1, args.cells + 1)}), feats], axis=1)
    key, out = SiteKey("P1", "A01", 1), Path(tempfile.mkdtemp())
    provenance = {"channels": channels, "model_card": {"notes": "x" * 2000}}

    def table() -> pd.DataFrame:
        return site_table(key, cells, "model", "batch", None, {"Metadata_Compound": "DMSO"})

    def per_site(convert) -> float:
        """Median seconds per site: the table, its conversion by ``convert``, the Parquet file."""
        times = []
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            write_parquet(convert(table()), out / f"site{i}.parquet", provenance)
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:]))

    from_pandas = per_site(lambda df: pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None))
    blocks = per_site(arrow_table)
    print(json.dumps({"cells": args.cells, "columns": int(table().shape[1]), "repeats": args.repeats,
                      "seconds_per_site": {"from_pandas": round(from_pandas, 4), "arrow_table": round(blocks, 4)},
                      "speed_up": round(from_pandas / blocks, 2)}, indent=1))


if __name__ == "__main__":
    main()
