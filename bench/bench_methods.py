"""Speed of exact activation patching and ACDC (issue 14, "Speed"), measured in one run.

    .venv/bin/python bench/bench_methods.py [--device cpu|cuda] [--n-batches 1] [--edges-per-pass 8 32 128]

Exact patching: every edge of a 2-layer model of GPT-2 small's width (12 heads, d_model 768, d_mlp 3072, vocab
50,257, random weights; 606 edges with separate Q/K/V), on bench_speed.py's prompts (batches of 8 prompts x 16
tokens; --n-batches of them). Exact patching costs one forward pass per batch and group of `edges_per_pass` edges,
so its time should be (passes) x (the time of one such pass) with passes = batches x ceil(edges / edges_per_pass):
for each `edges_per_pass` the script reports the total time, the time per pass (total / passes), one pass timed
alone (`run_mask_groups` with that many single-edge groups, best of 3), and their ratio (1.0 = proportional,
no overhead beyond the passes).
ACDC: `acdc_circuits` at auto-circuit's 20 thresholds on the zoo's induction model (2 layers x 4 heads, 81 edges,
64 prompts): (τ, edge) decisions per second and candidate circuits evaluated per second.
Times are single runs of wall-clock time (the exact-patching runs are long); on a shared machine expect noise.
"""
import argparse, math, os, platform, sys, time, warnings
from pathlib import Path

import torch as t

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_lens import HookedTransformer, HookedTransformerConfig

from bench_speed import workload  # the same prompts as the speed benchmark
from circuit_nb import patchable_model, show_progress, source_outputs
from circuit_nb.acdc import acdc_circuits
from circuit_nb.exact_patching import edge_group_masks, exact_prune_scores, groups_per_pass, run_mask_groups
from circuit_nb.zoo import load_task


def gpt2_width(n_layers, device):
    "bench_speed.gpt2_small_shape with `n_layers` layers."
    cfg = HookedTransformerConfig(n_layers=n_layers, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257,
                                  n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=0, device=device)
    return HookedTransformer(cfg).eval()


def sync(device):
    if device == "cuda": t.cuda.synchronize()


def one_pass_time(pm, batch, ablations, k, device, repeats=3):
    "Best-of-`repeats` time of one forward pass with `k` single-edge mask groups on `batch`."
    edges = list(pm.edges)[:k]
    masks = edge_group_masks(pm, [[e] for e in edges])
    run_mask_groups(pm, batch.clean, ablations, masks); sync(device)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter(); run_mask_groups(pm, batch.clean, ablations, masks); sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-batches", type=int, default=1)
    ap.add_argument("--edges-per-pass", type=int, nargs="+", default=[8, 32, 128])
    args = ap.parse_args()
    show_progress(False)
    dev = args.device
    model = gpt2_width(2, dev)
    for p in model.parameters(): p.requires_grad_(False)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", device=t.device(dev))
    loader = workload(dev, n_batches=args.n_batches)
    batch = next(iter(loader))
    ablations = source_outputs(pm, batch.corrupt)
    n = pm.n_edges
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {t.__version__}, device {dev}" + \
              (f" ({t.cuda.get_device_name()})" if dev == "cuda" else f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    lines = [f"## bench_methods {time.strftime('%Y-%m-%d %H:%M')} — {machine}", "",
             f"exact patching, 2-layer GPT-2-width model, {n} edges, {args.n_batches} batch(es) x 8 prompts x 16 tokens "
             f"(the default edges_per_pass here: {groups_per_pass(pm, batch.clean)})", "",
             "| edges per pass | passes | total (s) | per pass (s) | one pass alone (s) | ratio | edges·prompts / s |",
             "|---|---|---|---|---|---|---|"]
    for epp in args.edges_per_pass:
        print(f"exact patching, {epp} edges per pass ...", file=sys.stderr, flush=True)
        passes = args.n_batches * math.ceil(n / epp)
        alone = one_pass_time(pm, batch, ablations, epp, dev)
        start = time.perf_counter(); exact_prune_scores(pm, loader, None, edges_per_pass=epp); sync(dev)
        total = time.perf_counter() - start
        lines.append(f"| {epp} | {passes} | {total:.2f} | {total / passes:.3f} | {alone:.3f} | {total / passes / alone:.2f} "
                     f"| {n * 8 * args.n_batches / total:.0f} |")
    pm.unwrap()

    print("ACDC on the induction model ...", file=sys.stderr, flush=True)
    task = load_task("induction", device=t.device(dev))
    taus = [b * 10 ** e for b in (1, 3, 5, 7, 9) for e in range(-5, -1)]
    result = acdc_circuits(task.model, task.train_loader, taus)
    lines += ["", f"ACDC, zoo induction model ({result.n_edges} edges, {len(task.train_loader.dataset)} prompts, "
              f"{len(taus)} thresholds): {result.seconds:.2f} s, {result.decisions} (τ, edge) decisions = "
              f"{result.decisions / result.seconds:.0f} per second; {result.evaluations} candidate circuits evaluated = "
              f"{result.evaluations / result.seconds:.0f} per second; {result.n_edges / result.seconds:.0f} edges per second "
              f"(all thresholds)"]
    print("\n".join(lines))


if __name__ == "__main__": main()
