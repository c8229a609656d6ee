"""Training memory against corpus size: peak RSS of both stages trained from a corpus on disk, memory-mapped or
streamed (``streaming: true``), for corpora of 10^5 and 2·10^6 cells.

A synthetic corpus of sparse counts (``--genes`` genes, ``--expressed`` nonzeros per cell, a 4-label covariate) is
written in our corpus layout one batch at a time (never all in memory), then each run is a fresh subprocess with the
tiny recipe (``training/configs/tiny.yaml``, 1 torch thread): ``vae`` trains the VAE ``--steps`` steps, ``dit``
encodes the whole corpus into the latent cache with a tiny VAE and trains the DiT ``--steps`` steps. Each child
reports its own peak RSS (``VmHWM``), its RSS after imports, and its peak anonymous RSS (``RssAnon`` sampled every
20 ms: memory-mapped file pages are reclaimable page cache, anonymous ones are not), also per phase (the training
functions in `TRACKED_PHASES`). Prints markdown tables; the corpora and outputs live under ``--workdir`` and are
deleted.

    nice -n 5 python benchmarks/bench_streaming.py --cells 100000 2000000
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench_data import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
WRITE_BATCH = 10_000
LABELS = ["A", "B", "C", "D"]
# functions whose peak memory is reported apart ("module" or "module:Class" -> names)
TRACKED_PHASES = {
    "scldm_hf.training.data": ["_cells_digest", "first_rows"],
    "scldm_hf.training.vae": ["split_train_validation", "train_loop", "evaluate_vae"],
    "scldm_hf.training.dit": ["split_train_validation", "encode_latent_cache", "standardize_latents",
                              "fit_library_size_model", "train_loop", "pipeline_card_metrics"],
}


def write_synthetic_corpus(folder: Path, n_cells: int, n_genes: int, expressed: int, seed: int = 0) -> None:
    """A corpus of `n_cells` cells with `expressed` distinct genes each, written `WRITE_BATCH` cells at a time."""
    import scipy.sparse as sp

    from scldm_hf.data.corpus import cells_to_corpus

    def batches():
        rng = np.random.default_rng(seed)
        for start in range(0, n_cells, WRITE_BATCH):
            rows = min(WRITE_BATCH, n_cells - start)
            genes = np.argpartition(rng.random((rows, n_genes), dtype=np.float32), expressed, axis=1)[:, :expressed]
            counts = (rng.negative_binomial(2, 0.5, rows * expressed) + 1).astype(np.int32)
            matrix = sp.csr_matrix((counts, np.sort(genes, axis=1).ravel(), np.arange(rows + 1) * expressed),
                                   shape=(rows, n_genes))
            yield ([f"cell{index:08d}" for index in range(start, start + rows)], matrix,
                   {"cell_type": rng.integers(0, len(LABELS), rows)})

    cells_to_corpus(batches(), folder, [f"GENE{index:05d}" for index in range(n_genes)], {"cell_type": LABELS},
                    source=f"synthetic ({n_cells} cells)")


def status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


class MemorySampler(threading.Thread):
    """Samples this process's ``RssAnon`` and ``VmRSS`` every 20 ms; `peak_mb` is the largest ``RssAnon`` seen,
    `phases` the largest of both per phase (the innermost `Phases` function running)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb, self.running, self.phase, self.phases = 0, True, "other", {}

    def run(self):
        while self.running:
            anon, rss = status_kb("RssAnon"), status_kb("VmRSS")
            self.peak_kb = max(self.peak_kb, anon)
            peaks = self.phases.setdefault(self.phase, {"anon_mb": 0.0, "rss_mb": 0.0})
            peaks["anon_mb"], peaks["rss_mb"] = max(peaks["anon_mb"], anon / 1024), max(peaks["rss_mb"], rss / 1024)
            time.sleep(0.02)

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024

    def track(self, owner, name: str) -> None:
        """Replace ``owner.name`` (a module function or a classmethod called on its class) by one that is phase
        `name` while it runs."""
        function = getattr(owner, name)

        def tracked(*args, **kwargs):
            outer, self.phase = self.phase, name
            try:
                return function(*args, **kwargs)
            finally:
                self.phase = outer

        setattr(owner, name, tracked)


def worker(stage: str, streaming: bool, corpus: str, output_dir: str, steps: int, vae_dir: str | None) -> dict:
    import torch

    from scldm_hf.training import DiTTrainingConfig, VAETrainingConfig, load_config
    from scldm_hf.training.dit import train_dit
    from scldm_hf.training.vae import train_vae

    torch.set_num_threads(1)
    options = {"data": corpus, "output_dir": output_dir, "streaming": streaming, "max_train_steps": steps,
               "lr_warmup_steps": 1, "checkpointing_steps": steps + 1, "logging_steps": steps, "batch_size": 64,
               "validation_fraction": 0.01, "num_threads": 1}
    import_rss = peak_rss_mb()
    sampler = MemorySampler()
    for owner, names in TRACKED_PHASES.items():
        module = importlib.import_module(owner.rpartition(":")[0] or owner)
        for name in names:
            sampler.track(getattr(module, owner.rpartition(":")[2]) if ":" in owner else module, name)
    sampler.start()
    start = time.perf_counter()
    if stage == "vae":
        train_vae(load_config(VAETrainingConfig, TINY, options, section="vae"))
    else:
        train_dit(load_config(DiTTrainingConfig, TINY, options | {"vae_name_or_path": vae_dir,
                                                                 "encode_batch_size": 1024}, section="dit"))
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": import_rss,
            "peak_anon_mb": sampler.peak_mb, "end_file_rss_mb": status_kb("RssFile") / 1024, "phases": sampler.phases}


def run_child(*arguments: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--expressed", type=int, default=30, help="expressed genes per cell")
    parser.add_argument("--steps", type=int, default=50, help="training steps of each stage (batch 64)")
    parser.add_argument("--stages", nargs="+", choices=["vae", "dit"], default=["vae", "dit"])
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        stage, streaming, corpus, output_dir, steps, vae_dir = args.worker
        print(json.dumps(worker(stage, streaming == "stream", corpus, output_dir, int(steps), vae_dir)))
        return

    folder = Path(tempfile.mkdtemp(prefix="bench_streaming_", dir=args.workdir))
    rows = []
    try:
        vae_dir = folder / "vae"  # the stage-1 model every DiT run encodes with
        for n_cells in args.cells:
            corpus = folder / f"corpus_{n_cells}"
            start = time.perf_counter()
            write_synthetic_corpus(corpus, n_cells, args.genes, args.expressed)
            write = {"seconds": time.perf_counter() - start,
                     "mb": sum(path.stat().st_size for path in corpus.iterdir()) / 2**20}
            print(f"wrote {n_cells:,} cells ({write['mb']:.0f} MB) in {write['seconds']:.0f} s", file=sys.stderr)
            for stage in args.stages:
                for mode in ("mmap", "stream"):
                    output = folder / f"{stage}_{mode}_{n_cells}"
                    if stage == "dit" and not vae_dir.exists():
                        run_child("vae", "mmap", str(corpus), str(vae_dir), "1", "-")
                    run = run_child(stage, mode, str(corpus), str(output), str(args.steps), str(vae_dir))
                    rows.append({"cells": n_cells, "stage": stage, "mode": mode, "write": write, **run})
                    print(json.dumps(rows[-1]), file=sys.stderr)
                    shutil.rmtree(output)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"{args.genes} genes, {args.expressed} expressed per cell, {args.steps} steps of batch 64, 1 torch thread\n")
    print("| stage | read | cells | corpus MB | peak RSS MB | after imports MB | growth MB | peak anon RSS MB "
          "| file RSS at end MB | seconds |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['stage']} | {row['mode']} | {row['cells']:,} | {row['write']['mb']:.0f} | "
              f"{row['peak_rss_mb']:.0f} | {row['import_rss_mb']:.0f} | {row['peak_rss_mb'] - row['import_rss_mb']:.0f} "
              f"| {row['peak_anon_mb']:.0f} | {row['end_file_rss_mb']:.0f} | {row['seconds']:.0f} |")
    print("\nPeak anonymous / total RSS (MB) while each function ran (innermost; `other`: everything else):\n")
    phases = list(dict.fromkeys(phase for row in rows for phase in row["phases"]))  # in the order first seen
    print("| stage | read | cells | " + " | ".join(phases) + " |\n|---|---|---:|" + "---:|" * len(phases))
    for row in rows:
        peaks = [row["phases"].get(phase) for phase in phases]
        print(f"| {row['stage']} | {row['mode']} | {row['cells']:,} | " + " | ".join(
            "–" if peak is None else f"{peak['anon_mb']:.0f} / {peak['rss_mb']:.0f}" for peak in peaks) + " |")
    smallest, largest = min(args.cells), max(args.cells)
    print("\n| stage | read | peak RSS at largest / smallest | within +10 % |\n|---|---|---:|---|")
    for stage in args.stages:
        for mode in ("mmap", "stream"):
            peak = {row["cells"]: row["peak_rss_mb"] for row in rows if row["stage"] == stage and row["mode"] == mode}
            ratio = peak[largest] / peak[smallest]
            print(f"| {stage} | {mode} | {ratio:.3f} | {'yes' if ratio <= 1.10 else 'no'} |")


if __name__ == "__main__":
    main()
