"""Data parallelism of edge attribution patching: time per prompt on 1 and 2 ranks, and the collectives' share (issue 15).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_data_parallel.py [--repeats 3] [--ranks 1 2] [--batches 8]
        [--batch-size 8] [--seq 16] [--inner 1] [--out bench/RESULTS.md]

Run plainly, the script launches itself with `circuit_nb.distributed.torchrun` on each number of processes of
`--ranks` (1 and 2), alternately, `--repeats` times, so that the machine's slow spells (it is shared) fall on both alike,
and prints a table. Each launch is a worker run (`--worker`, one process per rank, backend gloo, OMP_NUM_THREADS=1 per
process): every rank builds the same GPT-2-small-shaped model and loader (`bench_speed.gpt2_small_shape`, `workload`:
random weights, seeded prompts), runs `edge_attribution_patching_prune_scores` once to warm up (one batch per rank),
then `--inner` timed runs over the whole loader, each started after a barrier. The library splits the batches across
the ranks by itself (`circuit_nb.distributed`): one `gather_objects` of the loader's digest (`same_batches`), each rank's
batches, one `gather_objects` of failures (`on_every_rank`), one `all_reduce_sum_` of the scores.

The time in those collectives is measured by wrapping `gather_objects` and `all_reduce_sum_` with timers wherever
the library's modules look them up (`circuit_nb.distributed.gather_objects`, `circuit_nb.mask_gradients.all_reduce_sum_`,
...). A collective's time on a rank includes its wait for the other rank to arrive, so it is reported two ways:
the largest over the ranks (what the slower-to-arrive rank's partner waited: load imbalance + communication) and the
smallest (the rank that arrived last waits least: about the communication itself).
The CPU time of the EAP run, summed over the ranks (`time.process_time`, all threads of each process), shows the
work itself apart from the machine's other jobs: wall time per prompt on 2 ranks only falls if 2 cores are free.
Rank 0 writes its numbers (JSON) and its scores (`torch.save`) to files the launcher reads; the launcher checks
that the 2-rank scores equal the 1-rank ones (max abs difference / max abs score).
"""
import argparse, json, os, platform, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
import torch as t

HERE = Path(__file__).resolve().parent
SECTION = "## Data parallelism: edge attribution patching on 1 and 2 ranks (issue 15)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="launches per number of ranks (alternating); best is reported")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="numbers of processes to compare (the first is the reference)")
    ap.add_argument("--batches", type=int, default=8, help="batches in the loader (split across the ranks)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    ap.add_argument("--seq", type=int, default=16, help="tokens per prompt")
    ap.add_argument("--inner", type=int, default=1, help="timed runs inside each launch, after one warm-up (best is kept)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a launch is stopped")
    ap.add_argument("--out", default=None, help="append the results to this markdown file")
    ap.add_argument("--worker", default=None, metavar="JSON", help=argparse.SUPPRESS)  # worker mode: rank 0 writes JSON here
    ap.add_argument("--scores", default=None, help=argparse.SUPPRESS)  # worker mode: rank 0 saves its scores here
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- worker (one rank)
class CollectiveTimer:
    "Wraps the library's collective functions wherever its modules look them up; records (function, caller, seconds) per call."
    names = ("gather_objects", "all_reduce_sum_")

    def __init__(self):
        import circuit_nb.distributed as d
        self.calls, self.active, self.patched = [], False, []
        originals = {n: getattr(d, n) for n in self.names}
        wrappers = {n: self._wrap(n, f) for n, f in originals.items()}
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "circuit_nb" or mod_name.startswith("circuit_nb.")): continue
            for n, f in originals.items():
                if getattr(mod, n, None) is f:
                    setattr(mod, n, wrappers[n]); self.patched.append(f"{mod_name}.{n}")

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            start = time.perf_counter()
            try: return fn(*args, **kwargs)
            finally:
                if self.active: self.calls.append((name, caller, time.perf_counter() - start))
        timed.__wrapped__ = fn
        return timed


def worker(args):
    import torch.distributed as dist
    from circuit_nb import patchable_model, show_progress
    from circuit_nb.distributed import rank_and_world
    import circuit_nb.edge_attribution_patching as eap_mod
    sys.path.insert(0, str(HERE))
    from bench_speed import gpt2_small_shape, workload

    dist.init_process_group("gloo")
    rank, world = rank_and_world()
    show_progress(False)
    timer = CollectiveTimer()  # after the imports: every module holding the names is patched
    t.manual_seed(0)
    model = gpt2_small_shape("cpu")
    for p in model.parameters(): p.requires_grad_(False)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", device=t.device("cpu"))
    loader = workload("cpu", n_batches=args.batches, batch_size=args.batch_size, seq=args.seq)
    warm = workload("cpu", n_batches=world, batch_size=args.batch_size, seq=args.seq)  # one batch per rank

    def eap(dl): return eap_mod.edge_attribution_patching_prune_scores(pm, dl, None)
    eap(warm)  # warm-up: allocator, autograd, gloo's first collectives
    runs = []
    for _ in range(args.inner):
        dist.barrier()  # start together, so that a late start is not counted as waiting in a collective
        timer.calls, timer.active = [], True
        start, cpu_start = time.perf_counter(), time.process_time()
        scores = eap(loader)
        secs, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        timer.active = False
        runs.append({"secs": secs, "cpu": cpu, "calls": timer.calls})
    best = min(runs, key=lambda r: r["secs"])
    mine = {"rank": rank, "secs": best["secs"], "cpu": best["cpu"], "calls": best["calls"], "all_secs": [r["secs"] for r in runs],
            "threads": t.get_num_threads()}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)  # directly, not through the timed library functions
    if rank == 0:
        t.save({k: v.detach().cpu() for k, v in scores.items()}, args.scores)
        Path(args.worker).write_text(json.dumps({"world": world, "ranks": everyone, "patched": timer.patched,
                                                 "n_edges": pm.n_edges, "n_prompts": len(loader.prompt_dataset.clean_prompts)}))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- launcher
def summarise(result):
    "EAP time of a launch (the last rank to finish), and collective times: per rank, per function/caller."
    ranks = result["ranks"]
    secs = max(r["secs"] for r in ranks)
    per_rank = [sum(c[2] for c in r["calls"]) for r in ranks]
    by_site = {}
    for r in ranks:
        for name, caller, s in r["calls"]:
            by_site.setdefault(f"{name} ({caller})", [0.0] * len(ranks))[r["rank"]] += s
    cpu = sum(r["cpu"] for r in ranks)
    return {"world": result["world"], "secs": secs, "per_prompt": secs / result["n_prompts"],
            "cpu": cpu, "cpu_per_prompt": cpu / result["n_prompts"], "coll_max": max(per_rank),
            "coll_min": min(per_rank), "by_site": by_site, "n_calls": len(ranks[0]["calls"]),
            "work": [r["secs"] - c for r, c in zip(ranks, per_rank)], "threads": [r["threads"] for r in ranks]}


def score_agreement(a, b):
    "Largest absolute difference between two score dicts, and the largest absolute score of `a`."
    if a.keys() != b.keys(): raise ValueError(f"the score dicts have different modules: {sorted(a.keys() ^ b.keys())}")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return diff, max(float(a[k].abs().max()) for k in a)


def load_average():
    return os.getloadavg()[0]


def launch(args, n, tmp, i):
    from circuit_nb.distributed import torchrun
    out, scores = Path(tmp) / f"r{n}_{i}.json", Path(tmp) / f"s{n}_{i}.pt"
    worker_args = ["--worker", out, "--scores", scores, "--batches", args.batches, "--batch-size", args.batch_size,
                   "--seq", args.seq, "--inner", args.inner]
    start = time.perf_counter()
    torchrun(Path(__file__).resolve(), nproc_per_node=n, args=worker_args, timeout=args.timeout)
    wall = time.perf_counter() - start
    res = summarise(json.loads(out.read_text()))
    res["scores"], res["launch_wall"], res["n_edges"] = t.load(scores), wall, json.loads(out.read_text())["n_edges"]
    return res


def main(args):
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")  # one BLAS thread per process
    command = "PYTHONPATH=$PWD python bench/bench_data_parallel.py " + " ".join(sys.argv[1:])
    load_before = load_average()
    results = {n: [] for n in args.ranks}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for n in args.ranks:
                r = launch(args, n, tmp, i)
                results[n].append(r)
                print(f"repeat {i + 1}/{args.repeats}, {n} rank(s): EAP {r['secs']:.3f} s ({r['per_prompt'] * 1e3:.1f} ms/prompt), "
                      f"collectives max {r['coll_max']:.4f} s / min {r['coll_min']:.4f} s, launch {r['launch_wall']:.1f} s, "
                      f"load {load_average():.2f}", file=sys.stderr, flush=True)
    load_after = load_average()

    ref_n = args.ranks[0]
    best = {n: min(rs, key=lambda r: r["secs"]) for n, rs in results.items()}
    ref = best[ref_n]
    n_prompts = args.batches * args.batch_size
    agreement = {n: [score_agreement(results[ref_n][i]["scores"], r["scores"]) for i, r in enumerate(rs)]
                 for n, rs in results.items() if n != ref_n}
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {t.__version__}, device cpu, backend gloo, "
               f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, torch threads per rank {ref['threads'][0]}")
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — {machine}", "",
             f"`{command}`; GPT-2-small shape ({ref['n_edges']:,} edges; "
             f"{args.batches} batches × {args.batch_size} prompts × {args.seq} tokens = {n_prompts} prompts), "
             f"each number of ranks launched {args.repeats}× alternately, best launch shown (each launch: 1 warm-up, "
             f"best of {args.inner} timed); 1-minute load average {load_before:.2f} before, {load_after:.2f} after", "",
             "| ranks | batches per rank | EAP time (s) | time per prompt (ms) | ratio to 1 rank | collectives, max over ranks (s) | "
             "collectives, min over ranks (s) | collectives (max) / EAP time | CPU time per prompt, all ranks (ms) | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.ranks:
        b = best[n]
        share = b["coll_max"] / b["secs"]
        target = "" if n == 1 else f"< 10 % {'met' if share < 0.10 else 'NOT met'}"
        lines.append(f"| {n} | {-(-args.batches // n)} | {b['secs']:.3f} | {b['per_prompt'] * 1e3:.1f} | "
                     f"{b['per_prompt'] / ref['per_prompt']:.2f} | {b['coll_max']:.4f} | {b['coll_min']:.4f} | "
                     f"{100 * share:.2f} % | {b['cpu_per_prompt'] * 1e3:.1f} | {target} |")
    lines.append("")
    for n in args.ranks:
        if n == ref_n: continue
        rs = results[n]
        lines.append(f"- {n} ranks, every launch: EAP " + ", ".join(f"{r['secs']:.2f}" for r in rs) + f" s (1 rank: "
                     + ", ".join(f"{r['secs']:.2f}" for r in results[ref_n]) + " s); collectives (max over ranks) "
                     + ", ".join(f"{100 * r['coll_max'] / r['secs']:.2f}" for r in rs) + " % of the EAP time")
        b = best[n]
        sites = "; ".join(f"{site}: " + " / ".join(f"{s:.4f}" for s in v) + " s" for site, v in b["by_site"].items())
        lines.append(f"- {n} ranks, best launch, time in each collective per rank (rank 0 / rank 1 ...): {sites}; "
                     f"work outside collectives per rank: " + " / ".join(f"{w:.3f}" for w in b["work"]) + " s")
        worst = max(d / m for d, m in agreement[n])
        lines.append(f"- scores on {n} ranks vs {ref_n}: max |difference| / max |score| = {worst:.1e} over the {args.repeats} "
                     f"pairs of launches (max |score| {agreement[n][0][1]:.3g})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        existing = Path(args.out).read_text() if Path(args.out).exists() else ""
        with open(args.out, "a") as f:
            if SECTION not in existing: f.write(f"\n{SECTION}\n\n")
            f.write(text + "\n")


if __name__ == "__main__":
    a = parse_args()
    if a.worker is not None: worker(a)
    elif "RANK" in os.environ: sys.exit("a torchrun launch needs --worker JSON --scores PATH (run the script plainly: it launches itself)")
    else: main(a)
