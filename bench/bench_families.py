"""Speed and memory of edge attribution patching on a Llama-shaped model, Hugging Face vs TransformerLens adapters (issue 13).

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 .venv/bin/python bench/bench_families.py [--repeats 3] [--device cpu|cuda] [--out bench/RESULTS.md]

Model: Llama-shaped, built from a config with random weights (seed 0): 8 layers, d_model 1024, 16 query heads and
4 key/value heads of 64 dimensions (grouped-query attention), gated SiLU MLP of 2,816, RMSNorm, RoPE, vocab 32,000,
untied embeddings; once as `transformers.LlamaForCausalLM` (the Hugging Face adapter, 00f) and once as a
TransformerLens 3 `HookedTransformer` (the TransformerLens adapter, 00e). Workload: 2 batches x 4 prompts x 16 tokens.

For each adapter, in one run and with the conventions of `bench_speed.py` (its `Meter`: best of --repeats, the sides
of each ratio run alternately, peak memory = growth of VmHWM on the CPU, of torch's peak allocation on CUDA):
the floor = the same model unwrapped (a copy), a forward pass on the corrupt prompts plus a forward and backward pass
on the clean ones (gradient to the embeddings only); edge attribution patching = `mask_gradient_prune_scores(...,
"logit", "avg_diff", mask_val=0.0)` on the wrapped model (factorized, separate Q/K/V, last position); and the
hook-based `edge_attribution_patching_prune_scores` (same scores, by hooks). Targets: <= 1.5x the floor in time and
in peak memory. Times are measured first (malloc as by default, best of --repeats); then, on the CPU, peak memory in a
second pass (best of 2) with glibc's mmap threshold fixed and the heap trimmed before each call (`fixed_mmap_threshold`,
`TrimmedMeter`), so that every large tensor's pages count when allocated and no freed memory hides or offsets them.
"""
import argparse, copy, os, platform, sys, time, warnings
from pathlib import Path

import torch as t

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import Meter  # noqa: E402  (the same measuring conventions)

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
import transformers  # noqa: E402
import transformer_lens  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from circuit_nb import PromptDataLoader, PromptDataset, patchable_model, show_progress  # noqa: E402
from circuit_nb.mask_gradients import mask_gradient_prune_scores  # noqa: E402
from circuit_nb.edge_attribution_patching import edge_attribution_patching_prune_scores  # noqa: E402

SHAPE = dict(n_layers=8, d_model=1024, n_heads=16, n_kv_heads=4, d_head=64, d_mlp=2816, d_vocab=32000, n_ctx=2048)


def llama_hf(device):
    "The Llama shape as a Hugging Face `LlamaForCausalLM`, random weights."
    s = SHAPE
    cfg = transformers.LlamaConfig(vocab_size=s["d_vocab"], hidden_size=s["d_model"], intermediate_size=s["d_mlp"],
                                   num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                                   num_key_value_heads=s["n_kv_heads"], head_dim=s["d_head"], hidden_act="silu",
                                   max_position_embeddings=s["n_ctx"], rms_norm_eps=1e-5, tie_word_embeddings=False)
    t.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device).eval()


def llama_tl(device):
    "The Llama shape as a TransformerLens 3 `HookedTransformer`, random weights."
    s = SHAPE
    cfg = HookedTransformerConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"], d_head=s["d_head"],
                                  n_key_value_heads=s["n_kv_heads"], d_mlp=s["d_mlp"], d_vocab=s["d_vocab"], n_ctx=s["n_ctx"],
                                  act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
                                  positional_embedding_type="rotary", rotary_dim=s["d_head"], eps=1e-5, seed=0, device=device)
    return HookedTransformer(cfg).eval()


def workload(device, d_vocab, n_batches=2, batch_size=4, seq=16):
    "Random clean and corrupt prompts with one answer and one wrong answer each (as `bench_speed.workload`)."
    g = t.Generator().manual_seed(0)
    clean, corrupt = (t.randint(0, d_vocab, (n_batches * batch_size, seq), generator=g) for _ in range(2))
    answers, wrong = (t.randint(0, d_vocab, (n_batches * batch_size, 1), generator=g) for _ in range(2))
    data = PromptDataset(clean.to(device), corrupt.to(device), answers.to(device), wrong.to(device))
    return PromptDataLoader(data, seq_len=None, diverge_idx=0, batch_size=batch_size)


def floor_fn(reference, loader, family):
    "The floor: the unwrapped model's corrupt forward + clean forward and backward, gradient to the embeddings only."
    if family == "TransformerLens":
        def embed_requires_grad(x, hook): return x.detach().requires_grad_(True)
        def clean_logits(tokens): return reference.run_with_hooks(tokens, fwd_hooks=[("hook_embed", embed_requires_grad)])
        def corrupt(tokens): return reference(tokens)
    else:
        embed = reference.get_input_embeddings()
        def clean_logits(tokens):
            h = embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
            try: return reference(input_ids=tokens, use_cache=False).logits
            finally: h.remove()
        def corrupt(tokens): return reference(input_ids=tokens, use_cache=False).logits
    def floor():
        for b in loader:
            with t.no_grad(): corrupt(b.corrupt)
            logits = clean_logits(b.clean)[:, -1]
            (logits.gather(1, b.answers) - logits.gather(1, b.wrong_answers)).mean().backward()
    return floor


def prepare_family(family, build, dev):
    "The wrapped model, its floor and the two edge attribution patching functions for one adapter."
    model = build(dev)
    for p in model.parameters(): p.requires_grad_(False)
    reference = copy.deepcopy(model)  # the floor runs on an unwrapped twin
    loader = workload(dev, SHAPE["d_vocab"])
    floor = floor_fn(reference, loader, family)
    pm = patchable_model(model, factorized=True, separate_qkv=True, slice_output="last_seq", device=t.device(dev))
    out = {}
    def eap(): out["mask"] = mask_gradient_prune_scores(pm, loader, None, "logit", "avg_diff", mask_val=0.0)
    def hook_eap(): out["hooks"] = edge_attribution_patching_prune_scores(pm, loader, None)
    return dict(family=family, pm=pm, reference=reference, fns=(floor, eap, hook_eap), out=out)


_LIBC = None

def fixed_mmap_threshold(nbytes=1 << 17):
    """Make glibc's malloc serve every allocation of `nbytes` or more by its own mmap, returned to the system when freed
    (mallopt M_MMAP_THRESHOLD, which also stops the threshold from growing). By default the threshold grows up to
    32 MiB as large blocks are freed, after which freed tensors stay resident in the heap and a later run reuses them
    without raising VmHWM: in a first try the Hugging Face floor measured +0 MiB. Set only for the memory pass, as
    the extra page faults cost time."""
    global _LIBC
    import ctypes
    _LIBC = ctypes.CDLL("libc.so.6")
    if _LIBC.mallopt(-3, nbytes) != 1: raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


class TrimmedMeter(Meter):
    """`bench_speed.Meter`, but on the CPU it first hands the heap's free memory back to the system (malloc_trim), so that
    the resident size it measures growth from holds no freed memory that the measured call could give back meanwhile
    (which made growths read 0 or negative)."""
    def _reset_peak(self):
        if self.device != "cuda" and _LIBC is not None: _LIBC.malloc_trim(0)
        return super()._reset_peak()


def rows_of(prep, times, mems):
    "Rows (name, seconds or MiB, ratio) and a summary line for one adapter."
    (floor_time, eap_time, hook_time), (floor_mem, eap_mem, hook_mem) = times, mems
    out, family = prep["out"], prep["family"]
    # the two methods compute the same quantity (SPEC: mask gradients at 0 = edge attribution patching): say how close
    diff = max((out["mask"][k] - out["hooks"][k]).abs().max().item() for k in out["mask"])
    scale = max(v.abs().max().item() for v in out["mask"].values())
    summary = (f"**{family}** adapter ({prep['pm'].n_edges:,} edges): floor {floor_time:.3f} s, peak +{floor_mem / 2**20:.0f} MiB; "
               f"mask-gradient and hook scores agree to {diff:.1e} (largest score {scale:.1e})")
    rows = [(f"{family}: edge attribution patching (mask gradients, mask_val=0) / floor", eap_time, eap_time / floor_time),
            (f"{family}:   its peak memory (MiB) / the floor's", eap_mem / 2**20, eap_mem / floor_mem),
            (f"{family}: edge_attribution_patching_prune_scores (hooks) / floor", hook_time, hook_time / floor_time),
            (f"{family}:   its peak memory (MiB) / the floor's", hook_mem / 2**20, hook_mem / floor_mem)]
    return summary, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--families", default="Hugging Face,TransformerLens", help="comma-separated subset")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead: print torch.profiler's N most expensive operators (CPU time) of each measured function")
    ap.add_argument("--saved", type=int, default=0, metavar="N",
                    help="instead: print the N source lines whose tensors autograd saves for the backward pass take most memory")
    ap.add_argument("--out", default=None, help="append the results to this markdown file")
    args = ap.parse_args()
    show_progress(False)
    if os.environ.get("OMP_NUM_THREADS"): t.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    meter, dev = Meter(args.device, args.repeats), args.device
    builders = {"Hugging Face": llama_hf, "TransformerLens": llama_tl}
    load = os.getloadavg()
    preps = [prepare_family(f, builders[f], dev) for f in args.families.split(",")]
    if args.profile: return profile(preps, args.profile)
    if args.saved: return saved_tensors(preps, args.saved)
    times = [[secs for secs, _ in meter(*p["fns"])] for p in preps]  # time first, with malloc as it is by default
    if dev == "cpu": fixed_mmap_threshold()
    mem_meter = TrimmedMeter(dev, min(2, args.repeats))
    mems = [[mem for _, mem in mem_meter(*p["fns"])] for p in preps]
    summaries, rows = [], []
    for p, ts, ms in zip(preps, times, mems):
        s, r = rows_of(p, ts, ms)
        summaries.append(s); rows += r
        print(s, file=sys.stderr, flush=True)
        p["pm"].unwrap()
    load_after = os.getloadavg()

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {t.__version__}, transformers {transformers.__version__}, "
               f"transformer_lens {transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else _tl_version()}, device {dev}"
               + (f" ({t.cuda.get_device_name()})" if dev == "cuda" else
                  f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {t.get_num_threads()}"))
    command = "PYTHONPATH=$PWD " + (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else "") + \
              "python " + " ".join(sys.argv)
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — {machine}", "",
             f"`{command}`; best of {args.repeats}; load average {load[0]:.2f} before, {load_after[0]:.2f} after", "",
             *[f"- {s}" for s in summaries], "",
             "| measurement | time (s) or peak growth (MiB) | ratio | target |", "|---|---|---|---|"]
    for name, value, ratio in rows:
        lines.append(f"| {name} | {value:.3f} | {ratio:.2f} | <= 1.5 {'met' if ratio <= 1.5 else 'NOT met'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f: f.write(text + "\n")


def profile(preps, n):
    "Print where each measured function of each adapter spends its time (torch.profiler, self CPU time)."
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for p in preps:
        for fn in p["fns"]:
            fn()  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
            print(f"\n## {p['family']}: {fn.__name__}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n))
        p["pm"].unwrap()


def saved_tensors(preps, n):
    """Print, for each measured function, the bytes of the tensors other than parameters that autograd saves for backward
    (what a forward pass holds until its backward: the peak's main part), by the innermost source line of circuit_nb, transformers or
    transformer_lens that saved them; each storage counted once per function call, all batches together."""
    import traceback
    from collections import Counter
    for p in preps:
        weights = {q.untyped_storage().data_ptr() for m in (p["pm"].wrapped_model, p["reference"]) for q in m.parameters()}
        for fn in p["fns"]:
            seen, by_line = set(weights), Counter()  # parameters are resident anyway: not counted
            def pack(x):
                key = x.untyped_storage().data_ptr()
                if key not in seen and x.device.type != "meta":
                    seen.add(key)
                    frames = [f for f in traceback.extract_stack()[:-1]
                              if any(k in f.filename for k in ("circuit_nb", "transformers", "transformer_lens", "bench_families"))]
                    f = frames[-1] if frames else None
                    by_line[f"{Path(f.filename).name}:{f.lineno} {f.line.strip()[:70]}" if f else "?"] += x.untyped_storage().nbytes()
                return x
            with t.autograd.graph.saved_tensors_hooks(pack, lambda x: x): fn()
            print(f"\n## {p['family']}: {fn.__name__}: {sum(by_line.values()) / 2**20:.0f} MiB saved for backward")
            for line, nbytes in by_line.most_common(n): print(f"{nbytes / 2**20:8.1f} MiB  {line}")
        p["pm"].unwrap()


def _tl_version():
    from importlib.metadata import version
    return version("transformer_lens")


if __name__ == "__main__": main()
