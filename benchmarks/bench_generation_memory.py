"""Memory of streaming generation: peak RSS of `scldm_hf.pipelines.streaming.generate_to_file` for 10^5 and 10^6 cells.

A tiny untrained pipeline over the 765 PBMC genes (memory and throughput do not depend on the weights) generates
cells conditioned on one cell type into a corpus folder (Arrow shards) or an .h5ad, batch by batch. Each run is a
fresh process, so its peak RSS (``ru_maxrss``) is its own. Prints a markdown table.

    nice -n 10 python benchmarks/bench_generation_memory.py --num-cells 100000 1000000
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, resource, sys, time
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scldm_hf.data import anndata_to_dataset, load_pbmc68k_counts
from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.conditioning import CellConditioner
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines import SCLDMPipeline
from scldm_hf.pipelines.streaming import generate_to_file

num_cells, out, steps, batch_size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
dataset, info = anndata_to_dataset(load_pbmc68k_counts()[:200].copy(), covariates=["cell_type"])
vae = SCVAEModel(SCVAEConfig(gene_names=info.genes, hidden_size=16, num_latent_tokens=4, latent_dim=8,
                             encoder_layers=1, decoder_layers=1, encoder_cross_attention_heads=2,
                             decoder_cross_attention_heads=2, num_attention_heads=2))
conditioner = CellConditioner.from_dataset(dataset)
transformer = LatentDiTTransformer(num_latent_tokens=4, latent_dim=8, hidden_size=16, num_layers=1,
                                   num_attention_heads=2, timestep_embedding_dim=16,
                                   covariate_num_labels=conditioner.num_labels)
pipe = SCLDMPipeline(vae, transformer, FlowMatchEulerDiscreteScheduler(), conditioner)
pipe.set_progress_bar_config(disable=True)
setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
written = generate_to_file(pipe, out, conditions={"cell_type": "CD19+ B"}, num_cells=num_cells,
                           num_inference_steps=steps, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - start
print(json.dumps({"cells": written, "seconds": seconds, "setup_rss_kb": setup_rss,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--sink", choices=["corpus", "h5ad"], nargs="+", default=["corpus"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for sink in args.sink:
            for num_cells in args.num_cells:
                out = Path(folder) / f"cells_{sink}_{num_cells}{'.h5ad' if sink == 'h5ad' else ''}"
                result = subprocess.run([sys.executable, "-c", RUN, str(num_cells), str(out), str(args.steps),
                                         str(args.batch_size)], capture_output=True, text=True, check=True)
                run = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append((sink, run))
    print(f"steps={args.steps}, batch_size={args.batch_size}, 1 torch thread\n")
    print("| sink | cells | peak RSS (MB) | RSS before generating (MB) | seconds | cells/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for sink, run in rows:
        print(f"| {sink} | {run['cells']:,} | {run['peak_rss_kb'] / 1024:.0f} | {run['setup_rss_kb'] / 1024:.0f} | "
              f"{run['seconds']:.0f} | {run['cells'] / run['seconds']:,.0f} |")


if __name__ == "__main__":
    main()
