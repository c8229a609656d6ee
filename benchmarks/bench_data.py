"""Data-layer benchmark: backed h5ad -> corpus conversion (throughput, peak RSS) and loader throughput.

For each cell count a synthetic sparse h5ad of integer counts is written chunk by chunk (bounded memory), converted
with ``anndata_to_corpus`` in a fresh subprocess that reports its own peak RSS, then read back through a
``DataLoader`` with ``CellCollator`` (map-style and streaming). Temporary files live under ``--workdir`` and are
deleted. Prints a markdown table.

    python benchmarks/bench_data.py --cells 20000 200000
    python benchmarks/bench_data.py --quick
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

GENERATION_CHUNK = 2000


def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int, density: float, seed: int = 0) -> int:
    """Write ``n_cells x n_genes`` CSR integer counts (about ``density`` nonzero) chunk by chunk; returns the nnz."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice([f"batch{i}" for i in range(4)], n_cells))},
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(n_genes)])
    nnz = 0
    with h5py.File(path, "w") as file:
        file.attrs["encoding-type"], file.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.io.write_elem(file, "obs", obs)
        ad.io.write_elem(file, "var", var)
        for start in range(0, n_cells, GENERATION_CHUNK):
            rows = min(GENERATION_CHUNK, n_cells - start)
            pattern = sp.csr_matrix(rng.random((rows, n_genes), dtype=np.float32) < density)
            counts = (rng.negative_binomial(2, 0.5, pattern.nnz) + 1).astype(np.int32)
            chunk = sp.csr_matrix((counts, pattern.indices, pattern.indptr), shape=(rows, n_genes))
            if start == 0:
                ad.io.write_elem(file, "X", chunk)
            else:
                ad.io.sparse_dataset(file["X"]).append(chunk)
            nnz += chunk.nnz
    return nnz


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` would include the parent's RSS at fork)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def worker_convert(h5ad: str, output: str) -> dict:
    from scldm_hf.data import anndata_to_corpus

    rss_after_imports = peak_rss_mb()
    start = time.perf_counter()
    info = anndata_to_corpus(h5ad, output, covariates=["batch"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cells": info.num_cells, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": rss_after_imports}


def worker_load(corpus: str, batch_size: int, streaming: bool, numpy_format: bool) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from scldm_hf.data import CellCollator, load_corpus

    torch.set_num_threads(1)
    dataset, info = load_corpus(corpus, streaming=streaming)
    if numpy_format:
        dataset = dataset.with_format("numpy")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=CellCollator.from_corpus_info(info))
    start = time.perf_counter()
    cells = sum(len(batch["library_size"]) for batch in loader)
    return {"seconds": time.perf_counter() - start, "cells": cells}


def run_worker(*args: str) -> dict:
    """Run this script's worker mode in a fresh interpreter; its last stdout line is a JSON result."""
    result = subprocess.run(
        [sys.executable, __file__, "--worker", *args], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def directory_size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def benchmark(n_cells: int, n_genes: int, density: float, batch_size: int, workdir: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_data_", dir=workdir))
    try:
        h5ad, corpus = folder / "synthetic.h5ad", folder / "corpus"
        start = time.perf_counter()
        nnz = write_synthetic_h5ad(h5ad, n_cells, n_genes, density)
        generation_s = time.perf_counter() - start
        conversion = run_worker("convert", str(h5ad), str(corpus))
        loaders = {
            f"{style}_{row_format}_cells_s": run_worker("load", str(corpus), str(batch_size), style, row_format)
            for style, row_format in [("map", "python"), ("map", "numpy"), ("stream", "python")]
        }
        assert conversion["cells"] == n_cells and all(loader["cells"] == n_cells for loader in loaders.values())
        return {
            "cells": n_cells,
            "nnz": nnz,
            "h5ad_gb": directory_size_gb(folder) - directory_size_gb(corpus),
            "corpus_gb": directory_size_gb(corpus),
            "generation_s": generation_s,
            "conversion_s": conversion["seconds"],
            "conversion_cells_s": n_cells / conversion["seconds"],
            "peak_rss_mb": conversion["peak_rss_mb"],
            "import_rss_mb": conversion["import_rss_mb"],
            **{name: n_cells / loader["seconds"] for name, loader in loaders.items()},
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def markdown_table(results: list[dict], n_genes: int, batch_size: int) -> str:
    lines = [
        f"| cells | genes | nonzeros | h5ad GB | corpus GB | conversion s | conversion cells/s | peak RSS MB "
        f"(after imports) | loader cells/s (batch {batch_size}): map-style, python rows | map-style, numpy rows | "
        "streaming, python rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['cells']:,} | {n_genes:,} | {r['nnz']:,} | {r['h5ad_gb']:.2f} | {r['corpus_gb']:.2f} | "
            f"{r['conversion_s']:.1f} | {r['conversion_cells_s']:,.0f} | {r['peak_rss_mb']:.0f} ({r['import_rss_mb']:.0f}) | "
            f"{r['map_python_cells_s']:,.0f} | {r['map_numpy_cells_s']:,.0f} | {r['stream_python_cells_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 cells x 5,000 genes")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        mode, *params = args.worker
        if mode == "convert":
            result = worker_convert(*params)
        else:
            corpus, batch_size, style, row_format = params
            result = worker_load(corpus, int(batch_size), style == "stream", row_format == "numpy")
        print(json.dumps(result))
        return

    if args.quick:
        args.cells, args.genes = [2_000, 20_000], 5_000
    results = []
    for n_cells in args.cells:
        results.append(benchmark(n_cells, args.genes, args.density, args.batch_size, args.workdir))
        print(f"{n_cells:,} cells: {json.dumps(results[-1])}", file=sys.stderr)
    print(markdown_table(results, args.genes, args.batch_size))
    peaks = [r["peak_rss_mb"] for r in results]
    print(f"\nPeak RSS, largest / smallest run: {max(peaks) / min(peaks):.2f}x")


if __name__ == "__main__":
    main()
