"""Find the circuit of a zoo task with several processes, each computing its share of the prompts.

    torchrun --nproc_per_node=2 examples/data_parallel.py                 # the shipped default task, on the CPU
    torchrun --nproc_per_node=2 examples/data_parallel.py induction out/  # a task and where to write the results

This is the whole recipe: initialise a `torch.distributed` process group (backend "gloo" on the CPU, "nccl" with one
GPU per process), then call circuit_nb as in one process. Every method splits the loader's batches across the ranks
and combines their shares with collective operations, so every rank ends with the results one process would compute
on all the prompts (to float rounding). Rank 0 prints and writes them.
"""
import os, sys

import torch as t
import torch.distributed as dist

from circuit_nb.cli import discover_circuit


def main(task: str = "induction", out_dir: str = "outputs"):
    gpus = t.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # one GPU per process, or the CPU
    device = t.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpus else t.device("cpu")
    if gpus: t.cuda.set_device(device)
    dist.init_process_group("nccl" if gpus else "gloo")
    try: discover_circuit(task, out_dir, device=device)
    finally: dist.destroy_process_group()


if __name__ == "__main__": main(*sys.argv[1:3])
