"""Speed and memory of circuit_nb against the floor, measured in one run (issue 6).

    .venv/bin/python bench/bench_speed.py [--repeats 3] [--device cpu|cuda] [--out bench/RESULTS.md]

Workload: a GPT-2-small-shaped HookedTransformer built from a config (12 layers x 12 heads, d_model 768,
vocab 50,257, random weights), 2 batches x 8 prompts x 16 tokens. The floor: the same model unwrapped doing a
forward pass on the corrupt prompts plus a forward and backward pass on the clean ones (gradient to the
embeddings). Every time is the best of --repeats runs; the two sides of each ratio are run alternately, so that the
machine's slow spells (it is shared) fall on both alike.
The EAP-IG section (04a) times each variant against (its gradient evaluations + 1) x edge attribution patching;
--eap-ig-only measures that section alone.
Peak memory is the growth of the process's peak resident set (VmHWM, reset before each measurement) on the
CPU, or of torch's peak allocation on CUDA.
"""
import argparse, copy, os, platform, sys, time, warnings
from pathlib import Path

import torch as t

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuit_nb import (PromptDataLoader, PromptDataset, graph_edges, patch_mode, patchable_model, run_circuits,
                        show_progress, source_outputs)
from circuit_nb.mask_gradients import mask_gradient_prune_scores
from circuit_nb.eap_ig import clean_corrupted_prune_scores, eap_ig_activations_prune_scores, eap_ig_inputs_prune_scores


def gpt2_small_shape(device):
    cfg = HookedTransformerConfig(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257,
                                  n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=0, device=device)
    return HookedTransformer(cfg).eval()


def workload(device, n_batches=2, batch_size=8, seq=16):
    g = t.Generator().manual_seed(0)
    clean, corrupt = (t.randint(0, 50257, (n_batches * batch_size, seq), generator=g) for _ in range(2))
    answers, wrong = (t.randint(0, 50257, (n_batches * batch_size, 1), generator=g) for _ in range(2))
    data = PromptDataset(clean.to(device), corrupt.to(device), answers.to(device), wrong.to(device))
    return PromptDataLoader(data, seq_len=None, diverge_idx=0, batch_size=batch_size)


class Meter:
    "Best-of-n wall time and peak memory growth of a callable."
    def __init__(self, device, repeats):
        self.device, self.repeats = device, repeats

    def _sync(self):
        if self.device == "cuda": t.cuda.synchronize()

    def _reset_peak(self):
        if self.device == "cuda":
            t.cuda.reset_peak_memory_stats(); return t.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")

    def _peak(self):
        return t.cuda.max_memory_allocated() if self.device == "cuda" else _status("VmHWM")

    def measure(self, fn):
        "Wall time and peak memory growth of one call of `fn`."
        base = self._reset_peak()
        start = time.perf_counter(); fn(); self._sync()
        return time.perf_counter() - start, self._peak() - base

    def __call__(self, *fns):
        "Best-of-n time and peak of each of `fns`, their runs interleaved so that a slow spell of the machine hits all alike."
        print(f"measuring {', '.join(f.__name__ for f in fns)} ...", file=sys.stderr, flush=True)
        for fn in fns: fn(); self._sync()  # warm-up
        runs = [[self.measure(fn) for fn in fns] for _ in range(self.repeats)]
        return [(min(r[i][0] for r in runs), max(min(r[i][1] for r in runs), 1)) for i in range(len(fns))]


def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field): return int(line.split()[1]) * 1024
    raise KeyError(field)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ig-samples", type=int, default=4)
    ap.add_argument("--eap-ig-steps", type=int, default=4, help="steps of EAP-IG on inputs")
    ap.add_argument("--eap-ig-activation-steps", type=int, default=1, help="steps of EAP-IG on activations (x 25 components)")
    ap.add_argument("--eap-ig-only", action="store_true", help="measure only the EAP-IG section")
    ap.add_argument("--out", default=None, help="append the results to this markdown file")
    args = ap.parse_args()
    show_progress(False)
    meter, dev = Meter(args.device, args.repeats), args.device
    model = gpt2_small_shape(dev)
    for p in model.parameters(): p.requires_grad_(False)
    loader = workload(dev)
    rows = []

    def build_graph(): graph_edges(model, factorized=True, seq_len=16)
    [(graph_time, _)] = meter(build_graph)
    rows.append(("build GPT-2-small graph, seq_len=16 (519,856 edges)", graph_time, None, "<= 0.5 s", "s"))

    reference = copy.deepcopy(model)  # the floor and plain forwards run on an unwrapped twin, alongside the wrapped model
    def embed_requires_grad(x, hook): return x.detach().requires_grad_(True)
    def floor():
        for b in loader:
            with t.no_grad(): reference(b.corrupt)
            logits = reference.run_with_hooks(b.clean, fwd_hooks=[("hook_embed", embed_requires_grad)])[:, -1]
            (logits.gather(1, b.answers) - logits.gather(1, b.wrong_answers)).mean().backward()
    def plain_forward():
        with t.no_grad():
            for b in loader: reference(b.clean)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", device=t.device(dev))
    def eap(): mask_gradient_prune_scores(pm, loader, None, "logit", "avg_diff", mask_val=0.0)
    def ig(): mask_gradient_prune_scores(pm, loader, None, "logit", "avg_diff", integrated_grad_samples=args.ig_samples)
    ablations = {b.key: source_outputs(pm, b.corrupt) for b in loader}
    def patched_forward():
        with t.no_grad():
            for b in loader:
                with patch_mode(pm, ablations[b.key]): pm(b.clean)
    scores = {n: t.randn(s.shape, generator=t.Generator().manual_seed(0)).to(dev) for n, s in pm.new_prune_scores().items()}
    counts = [round(pm.n_edges * f) for f in t.linspace(0, 1, 20).tolist()]
    def twenty_circuits(): run_circuits(pm, loader, counts, scores)
    def twenty_plain_forwards():
        for _ in range(20): plain_forward()

    if args.eap_ig_only: rows = []
    else:
        (floor_time, floor_mem), (eap_time, eap_mem) = meter(floor, eap)
        (ig_time, _), (eap_time_2, _) = meter(ig, eap)
        (patched_time, _), (plain_time, _) = meter(patched_forward, plain_forward)
        (circuits_time, _), (plain_20_time, _) = meter(twenty_circuits, twenty_plain_forwards)
        n = args.ig_samples
        rows += [("edge attribution patching (mask gradients, mask_val=0) / floor", eap_time, eap_time / floor_time, "<= 1.5", "x"),
                 ("  its peak memory / the floor's", None, eap_mem / floor_mem, "<= 1.5", "x"),
                 (f"integrated gradients, {n} samples / ((n+1) x EAP)", ig_time, ig_time / ((n + 1) * eap_time_2), "<= 1.1", "x"),
                 ("patched forward, all masks 0 / plain forward", patched_time, patched_time / plain_time, "<= 1.3", "x"),
                 ("20 circuit sizes / 20 plain forwards", circuits_time, circuits_time / plain_20_time, "<= 1.0", "x")]

    # EAP-IG (04a): each variant against (gradient evaluations + 1) x edge attribution patching (mask gradients at 0)
    n, n_act, components = args.eap_ig_steps, args.eap_ig_activation_steps, 1 + 2 * model.cfg.n_layers
    def eap_ig_inputs(): eap_ig_inputs_prune_scores(pm, loader, None, steps=n)
    def eap_ig_activations(): eap_ig_activations_prune_scores(pm, loader, None, steps=n_act)
    def clean_corrupted(): clean_corrupted_prune_scores(pm, loader, None)
    def eap_ig_row(fn, name, evaluations):
        "Time `fn` against EAP; the row, also printed at once (the section is slow on a CPU)."
        (secs, _), (eap_secs, _) = meter(fn, eap)
        row = (name, secs, secs / (evaluations * eap_secs), "<= 1.1", "x")
        print(f"{name}: {secs:.3f} s, EAP {eap_secs:.3f} s, ratio {row[2]:.2f}", file=sys.stderr, flush=True)
        return row
    rows += [eap_ig_row(eap_ig_inputs, f"EAP-IG on inputs, {n} steps / ((n+1) x EAP)", n + 1),
             eap_ig_row(clean_corrupted, "clean-corrupted (2 gradient runs) / (2 x EAP)", 2),
             eap_ig_row(eap_ig_activations, f"EAP-IG on activations, {n_act} step(s) x {components} components / ((C n + 1) x EAP)",
                        components * n_act + 1)]
    pm.unwrap()

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {t.__version__}, device {dev}" + \
              (f" ({t.cuda.get_device_name()})" if dev == "cuda" else f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} — {machine}", "",
             "EAP-IG section only" if args.eap_ig_only else
             f"floor {floor_time:.3f} s (peak +{floor_mem / 2**20:.0f} MiB), plain forward {plain_time:.3f} s", "",
             "| measurement | time (s) | ratio | target |", "|---|---|---|---|"]
    for name, secs, ratio, target, unit in rows:
        shown = f"{secs:.3f}" if secs is not None else ""
        r = "" if ratio is None else f"{ratio:.2f}"
        ok = (secs if ratio is None else ratio) <= float(target.split()[1])
        lines.append(f"| {name} | {shown} | {r} | {target} {'met' if ok else 'NOT met'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f: f.write(text + "\n")


if __name__ == "__main__": main()
