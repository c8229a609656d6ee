"""Atlas adapter benchmark: a token/value atlas (Tahoe-100M layout) -> corpus, throughput and peak RSS per size.

For each cell count a synthetic atlas is written as a local copy of a Hub dataset repo (dataset card with the
`expression_data` and `gene_metadata` configs, parquet shards of `genes`/`expressions` rows led by a `<cls>` token,
the gene table), then converted with ``token_values_to_corpus`` in a fresh subprocess that reports its own peak RSS.
Flat peak RSS across sizes means memory is bounded by the row batch, not the atlas. Prints a markdown table.

    python benchmarks/bench_atlas.py --cells 20000 80000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_data import peak_rss_mb

ROWS_PER_FILE, ROWS_PER_WRITE = 20_000, 5_000
CLS_TOKEN = 0
CONFIG_FILES = {"expression_data": "data/train-*.parquet", "gene_metadata": "metadata/gene_metadata.parquet"}


def write_synthetic_atlas(folder: Path, n_cells: int, n_genes: int, expressed: int, seed: int = 0) -> int:
    """Write the atlas row block by row block (bounded memory); returns the number of gene values."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import DatasetCardData

    rng = np.random.default_rng(seed)
    (folder / "data").mkdir(parents=True)
    (folder / "metadata").mkdir()
    configs = [{"config_name": name, "data_files": [{"split": "train", "path": path}]}
               for name, path in CONFIG_FILES.items()]
    (folder / "README.md").write_text(f"---\n{DatasetCardData(configs=configs).to_yaml()}\n---\n")
    tokens = np.arange(1, n_genes + 1)
    pq.write_table(pa.table({"token_id": tokens, "gene_symbol": [f"GENE{i:05d}" for i in tokens]}),
                   folder / "metadata" / "gene_metadata.parquet")
    schema = pa.schema({"genes": pa.list_(pa.int64()), "expressions": pa.list_(pa.float32()), "drug": pa.string()})
    writer, values = None, 0
    for start in range(0, n_cells, ROWS_PER_WRITE):
        if start % ROWS_PER_FILE == 0:
            if writer is not None:
                writer.close()
            writer = pq.ParquetWriter(folder / "data" / f"train-{start // ROWS_PER_FILE:05d}.parquet", schema)
        rows = min(ROWS_PER_WRITE, n_cells - start)
        genes = np.stack([rng.choice(tokens, expressed, replace=False) for _ in range(rows)])
        counts = rng.negative_binomial(2, 0.5, (rows, expressed)) + 1
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * (expressed + 1))
        flat_genes = np.column_stack([np.full(rows, CLS_TOKEN), genes]).ravel()
        flat_values = np.column_stack([np.full(rows, -2.0), counts]).ravel().astype(np.float32)
        writer.write_table(pa.table({
            "genes": pa.ListArray.from_arrays(offsets, pa.array(flat_genes)),
            "expressions": pa.ListArray.from_arrays(offsets, pa.array(flat_values)),
            "drug": pa.array(rng.choice(["drugA", "drugB", "DMSO"], rows)),
        }, schema=schema))
        values += genes.size
    writer.close()
    return values


def worker_convert(atlas: str, output: str) -> dict:
    from scldm_hf.data.atlas import token_values_to_corpus

    rss_after_imports = peak_rss_mb()
    start = time.perf_counter()
    info = token_values_to_corpus(atlas, output, covariates=["drug"])
    return {"seconds": time.perf_counter() - start, "cells": info.num_cells, "peak_rss_mb": peak_rss_mb(),
            "import_rss_mb": rss_after_imports}


def benchmark(n_cells: int, n_genes: int, expressed: int, workdir: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_atlas_", dir=workdir))
    try:
        values = write_synthetic_atlas(folder / "atlas", n_cells, n_genes, expressed)
        result = subprocess.run([sys.executable, __file__, "--worker", str(folder / "atlas"), str(folder / "corpus")],
                                check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        conversion = json.loads(result.stdout.strip().splitlines()[-1])
        assert conversion["cells"] == n_cells
        return {"cells": n_cells, "values": values, **conversion}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--expressed", type=int, default=200, help="expressed genes per cell")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--worker", nargs=2, metavar=("ATLAS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_convert(*args.worker)))
        return
    print("| cells | genes | values | conversion s | cells/s | peak RSS MB (after imports) |\n|---:|---:|---:|---:|---:|---:|")
    for n_cells in args.cells:
        r = benchmark(n_cells, args.genes, args.expressed, Path(args.workdir))
        print(f"| {r['cells']:,} | {args.genes:,} | {r['values']:,} | {r['seconds']:.1f} | "
              f"{r['cells'] / r['seconds']:,.0f} | {r['peak_rss_mb']:.0f} ({r['import_rss_mb']:.0f}) |", flush=True)


if __name__ == "__main__":
    main()
