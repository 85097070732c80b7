### CELL: imports
from __future__ import annotations
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch as t
from torch import nn
from fastcore.basics import patch

from circuit_nb.adapter import NormSpec, has_hooks, heads_output, normalized_projection, norm_vjp

### CELL: layout
@dataclass(frozen=True)
class HFLayout:
    "Where a Hugging Face family keeps what patching reads and writes, as module paths."
    blocks: str  # the decoder blocks (a ModuleList), from the causal LM
    final_norm: str  # the norm before the unembedding, from the causal LM
    attn: str  # the attention module, from a block
    ln1: str  # the norm before attention, from a block
    ln2: str  # the norm before the MLP, from a block
    mlp: str  # the MLP, from a block
    qkv: Tuple[str, ...]  # the query, key and value projections (one name: fused), from the attention module
    out_proj: str  # the output projection (its input holds the heads' z), from the attention module
    fused: Optional[str] = None  # how a fused projection lays out Q, K, V: "blocks" (q | k | v) or "per_head" (per head q k v)
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D) rather than [out, in] (nn.Linear)

_LLAMA = HFLayout("model.layers", "model.norm", "self_attn", "input_layernorm", "post_attention_layernorm", "mlp",
                  ("q_proj", "k_proj", "v_proj"), "o_proj")
LAYOUTS: Dict[str, HFLayout] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA,
    "gpt2": HFLayout("transformer.h", "transformer.ln_f", "attn", "ln_1", "ln_2", "mlp", ("c_attn",), "c_proj",
                     fused="blocks", conv1d=True),
    "gpt_neox": HFLayout("gpt_neox.layers", "gpt_neox.final_layer_norm", "attention", "input_layernorm",
                         "post_attention_layernorm", "mlp", ("query_key_value",), "dense", fused="per_head"),
}  # Gemma-2 is recognised but refused: see `hf_unsupported_features`

### CELL: refusals
_POST_SUBLAYER_NORMS = ("gemma2", "gemma3", "gemma3_text", "olmo2")

def hf_unsupported_features(model: nn.Module) -> List[str]:
    "Why the edges of Hugging Face `model` cannot be patched exactly: one sentence per reason (empty when they can)."
    cfg, refused = model.config, []
    kind = getattr(cfg, "model_type", None)
    if kind in _POST_SUBLAYER_NORMS:
        refused.append(f"model_type={kind!r} normalises each attention layer's output after its heads are summed "
                       "(post_attention_layernorm), so a head adds no output of its own to the residual stream")
    elif kind not in LAYOUTS:
        refused.append(f"model_type={kind!r} is not a family circuit_nb maps onto its graph (supported: {', '.join(sorted(LAYOUTS))})")
    if getattr(model, "is_quantized", False) or getattr(cfg, "quantization_config", None) is not None:
        refused.append("the model is quantized: head outputs are computed from the output projection's weights, which it packs")
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1: refused.append(f"hf_device_map spreads the model over {len(devices)} devices: patching keeps every source's output on one")
    if kind == "gpt2" and getattr(cfg, "add_cross_attention", False): refused.append("add_cross_attention=True: cross-attention is not in the graph")
    return refused

### CELL: config view
class HFConfigView:
    "The facts of a Hugging Face model circuit_nb reads, under TransformerLens' config names (`n_layers`, `d_model`, ...)."
    attention_dir, default_prepend_bos = "causal", False
    def __init__(self, model: nn.Module):
        c, self._model = model.config, model
        self.n_layers, self.n_heads, self.d_model, self.d_vocab = c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.vocab_size
        self.n_key_value_heads = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.d_head = getattr(c, "head_dim", None) or self.d_model // self.n_heads
        self.n_ctx = c.max_position_embeddings
        self.positional_embedding_type = "standard" if c.model_type == "gpt2" else "rotary"
        self.original_architecture = (getattr(c, "architectures", None) or [type(model).__name__])[0]
        self.model_type = c.model_type

    dtype = property(lambda self: self._model.dtype)
    device = property(lambda self: self._model.device)
    def __repr__(self): return f"HFConfigView({self.original_architecture}, n_layers={self.n_layers}, n_heads={self.n_heads}, n_key_value_heads={self.n_key_value_heads}, d_model={self.d_model})"

### CELL: class
class HuggingFaceAdapter:
    "Patching's view of a Hugging Face causal LM: TransformerLens hook names mapped onto PyTorch hooks on the model's own modules."
    head_axis, weight_head_dim = 2, None  # heads are axis 2 of `[batch, seq, head, d_head]` activations; weights hold no head axis

    def __init__(self, model: nn.Module):
        if not self.accepts(model): raise TypeError(f"HuggingFaceAdapter needs a transformers PreTrainedModel, not {type(model).__name__}")
        if model.get_output_embeddings() is None:
            raise TypeError(f"{type(model).__name__} has no unembedding: wrap its causal language model (…ForCausalLM)")
        refused = hf_unsupported_features(model)
        if refused: raise NotImplementedError("circuit_nb cannot patch this model exactly: " + "; ".join(refused))
        self.model, self.layout, self.cfg = model, LAYOUTS[model.config.model_type], HFConfigView(model)
        self._taken = None  # what `take_over` changed, while the model is wrapped

    @staticmethod
    def accepts(model) -> bool:
        "Whether `model` is a Hugging Face `transformers` model."
        try: from transformers import PreTrainedModel
        except ImportError: return False
        return isinstance(model, PreTrainedModel)

    n_layers = property(lambda self: self.cfg.n_layers)
    n_heads = property(lambda self: self.cfg.n_heads)
    d_model = property(lambda self: self.cfg.d_model)
    has_mlp = True
    parallel_attn_mlp = property(lambda self: bool(getattr(self.model.config, "use_parallel_residual", False)))
    has_residual_nodes = False  # no module computes the residual stream between attention and MLP: factorized graphs only
    projects_head_inputs = True  # head inputs are always patched after their projections: the model has no per-head input

### CELL: modules
@patch
def block(self: HuggingFaceAdapter, b: int) -> nn.Module: return self.model.get_submodule(self.layout.blocks)[b]
@patch
def attn(self: HuggingFaceAdapter, b: int) -> nn.Module: return self.block(b).get_submodule(self.layout.attn)
@patch
def ln1(self: HuggingFaceAdapter, b: int) -> nn.Module: return self.block(b).get_submodule(self.layout.ln1)
@patch
def projection(self: HuggingFaceAdapter, b: int, letter: str) -> nn.Module:
    "The module computing projection `letter` of block `b` (the fused one for all letters, when fused)."
    names = self.layout.qkv
    return self.attn(b).get_submodule(names[0] if len(names) == 1 else names["QKV".index(letter)])

### CELL: weights
@patch
def head_weights(self: HuggingFaceAdapter, b: int, letter: str, heads: Optional[t.Tensor] = None) -> Tuple[t.Tensor, t.Tensor]:
    "`W [head, d_model, d_head]`, `bias [head, d_head]` of projection `letter` for each query head (of `heads`): under grouped-query attention its key/value head's."
    mod, H, dh, lay = self.projection(b, letter), self.n_heads, self.cfg.d_head, self.layout
    weight = mod.weight.T if lay.conv1d else mod.weight  # [out, in]
    bias = mod.bias if mod.bias is not None else weight.new_zeros(weight.shape[0])
    i = "QKV".index(letter)
    if lay.fused == "blocks": weight, bias = weight[i * H * dh:(i + 1) * H * dh], bias[i * H * dh:(i + 1) * H * dh]
    elif lay.fused == "per_head": weight, bias = weight.view(H, 3, dh, -1)[:, i].reshape(H * dh, -1), bias.view(H, 3, dh)[:, i].reshape(-1)
    n = weight.shape[0] // dh  # heads this projection computes: n_heads, or n_key_value_heads
    W, bias = weight.reshape(n, dh, -1).transpose(1, 2), bias.reshape(n, dh)
    if n != H: heads = (t.arange(H, device=W.device) if heads is None else heads) // (H // n)  # each query head's key/value head
    return (W, bias) if heads is None else (W[heads], bias[heads])

@patch
def out_weights(self: HuggingFaceAdapter, b: int) -> t.Tensor:
    "`W_O [head, d_head, d_model]`: what each head's z is multiplied by (the output projection's bias belongs to no head)."
    mod = self.attn(b).get_submodule(self.layout.out_proj)
    weight = mod.weight if self.layout.conv1d else mod.weight.T  # [head · d_head, d_model]
    return weight.reshape(self.n_heads, self.cfg.d_head, -1)

### CELL: norms
@patch
def norm_spec(self: HuggingFaceAdapter, norm: nn.Module) -> Optional[NormSpec]:
    "`norm` as a `NormSpec` when it is a LayerNorm or a (Llama-style) RMSNorm; None for others (handled through autograd)."
    if isinstance(norm, nn.LayerNorm): return NormSpec(True, norm.eps, norm.weight, norm.bias)
    if type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and self.cfg.model_type in ("llama", "qwen2", "mistral"):
        return NormSpec(False, norm.variance_epsilon, norm.weight)
    return None

@patch
def project_head_inputs(self: HuggingFaceAdapter, block, letter: str,
                        inputs: t.Tensor, # [..., head, batch, seq, d_model]: each head's input, before the block's first norm
                        heads: Optional[t.Tensor] = None, # which heads `inputs` holds (all when None)
                       ) -> t.Tensor:
    "The `letter` projection (Q, K or V) of the norm of per-head inputs: `[..., head, batch, seq, d_head]`."
    ln1 = self.ln1(block)
    return normalized_projection(self.norm_spec(ln1), ln1, inputs, *self.head_weights(block, letter, heads))

@patch
def head_input_vjp(self: HuggingFaceAdapter, block, letter: str,
                   resid: t.Tensor, # [batch, seq, d_model]: the input of the block, every head's input before patching
                   grad: t.Tensor, # [batch, seq, head, d_head]: the gradient of the `letter` projection
                  ) -> t.Tensor:
    "The gradient with respect to each head's own input `[head, batch, seq, d_model]`, where all of them equal `resid`."
    u = t.einsum("bshd,hmd->hbsm", grad, self.head_weights(block, letter)[0])
    ln1 = self.ln1(block)
    return norm_vjp(self.norm_spec(ln1), ln1, resid, u)

@patch
def normalize_head_input(self: HuggingFaceAdapter, block, resid: t.Tensor) -> t.Tensor:
    "The block's first norm of `resid`, as its projections read it."
    return self.ln1(block).forward(resid)

### CELL: names
for _name, _fmt in (("head_out", "blocks.{}.attn.hook_z"), ("mlp_out", "blocks.{}.hook_mlp_out"), ("mlp_in", "blocks.{}.hook_mlp_in"),
                    ("block_in", "blocks.{}.hook_resid_pre"), ("resid_post", "blocks.{}.hook_resid_post"), ("resid_mid", "blocks.{}.hook_resid_mid")):
    setattr(HuggingFaceAdapter, _name, lambda self, block, _fmt=_fmt: _fmt.format(block))
HuggingFaceAdapter.resid_start = "blocks.0.hook_resid_pre"
HuggingFaceAdapter.resid_end = property(lambda self: self.resid_post(self.n_layers - 1))

@patch
def head_in(self: HuggingFaceAdapter, block, letter=None):
    "The per-head input of block `block`: of query/key/value `letter`, or shared when `letter` is None."
    return f"blocks.{block}.hook_{letter.lower()}_input" if letter else f"blocks.{block}.hook_attn_in"
@patch
def projected_head_in(self: HuggingFaceAdapter, block, letter): return f"blocks.{block}.attn.hook_{letter.lower()}"
@patch
def head_in_letters(self: HuggingFaceAdapter, module_name: str) -> Optional[Tuple[int, Tuple[str, ...]]]:
    "`(block, letters)` of a per-head input name: the projections it feeds; None otherwise."
    parts = module_name.split(".")
    if len(parts) != 3 or parts[0] != "blocks": return None
    letters = {"hook_q_input": ("Q",), "hook_k_input": ("K",), "hook_v_input": ("V",), "hook_attn_in": ("Q", "K", "V")}.get(parts[2])
    return None if letters is None else (int(parts[1]), letters)

### CELL: weight names
def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)

@patch
def head_out_weight(self: HuggingFaceAdapter, block): return f"{self.layout.blocks}.{block}.{self.layout.attn}.{self.layout.out_proj}.weight"
@patch
def head_in_weight(self: HuggingFaceAdapter, block, letter=None):
    names = self.layout.qkv
    return f"{self.layout.blocks}.{block}.{self.layout.attn}.{names[0] if len(names) == 1 or letter is None else names['QKV'.index(letter)]}.weight"
@patch
def mlp_in_weight(self: HuggingFaceAdapter, block): return f"{self.layout.blocks}.{block}.{self.layout.mlp}"
@patch
def mlp_out_weight(self: HuggingFaceAdapter, block): return f"{self.layout.blocks}.{block}.{self.layout.mlp}"
HuggingFaceAdapter.embed_weight = property(lambda self: _path_of(self.model, self.model.get_input_embeddings()) + ".weight")
HuggingFaceAdapter.unembed_weight = property(lambda self: _path_of(self.model, self.model.get_output_embeddings()) + ".weight")

### CELL: hooks
def _pre_hook(module: nn.Module, fn: Callable, first: bool, view=None, unview=None):
    "Hook the first input of `module` (positional or `hidden_states=`): fn(input viewed) -> a replacement or None."
    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        new = fn(x if view is None else view(x))
        if new is None: return None
        new = new if unview is None else unview(new, x)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
    return module.register_forward_pre_hook(hook, prepend=first, with_kwargs=True)

def _out_hook(module: nn.Module, fn: Callable, first: bool, view=None, unview=None):
    "Hook the output of `module` (the first element of a tuple): fn(output viewed) -> a replacement or None."
    def hook(mod, args, output):
        x = output[0] if isinstance(output, tuple) else output
        new = fn(x if view is None else view(x))
        if new is None: return None
        new = new if unview is None else unview(new, x)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return module.register_forward_hook(hook, prepend=first)

def _heads_view(d_head: int): return lambda x: x.view(*x.shape[:-1], -1, d_head)
_flat = lambda new, x: new.reshape(*new.shape[:-2], -1)

@patch
def ungroup(self: HuggingFaceAdapter, x: t.Tensor) -> t.Tensor:
    "Keys or values `[batch, seq, n_key_value_heads·d_head]` repeated to one per query head `[batch, seq, n_heads·d_head]` (unchanged if already)."
    n_kv, H, dh = self.cfg.n_key_value_heads, self.n_heads, self.cfg.d_head
    if n_kv == H or x.shape[-1] != n_kv * dh: return x
    return x.view(*x.shape[:-1], n_kv, 1, dh).expand(*x.shape[:-1], n_kv, H // n_kv, dh).reshape(*x.shape[:-1], H * dh)

@patch
def _letter_slices(self: HuggingFaceAdapter, out: t.Tensor) -> List[t.Tensor]:
    "A fused projection's output split into Q, K and V, each `[batch, seq, head, d_head]`."
    H, dh = self.n_heads, self.cfg.d_head
    if self.layout.fused == "blocks": return [p.view(*p.shape[:-1], H, dh) for p in out.split(H * dh, -1)]
    return list(out.view(*out.shape[:-1], H, 3 * dh).split(dh, -1))

@patch
def _fuse(self: HuggingFaceAdapter, pieces: List[t.Tensor]) -> t.Tensor:
    "The inverse of `_letter_slices`."
    if self.layout.fused == "blocks": return t.cat([p.flatten(-2) for p in pieces], -1)
    return t.cat(pieces, -1).flatten(-2)

@patch
def _projection_hook(self: HuggingFaceAdapter, block: int, letter: str, fn: Callable, first: bool):
    "Hook projection `letter` of `block`: fn(`[batch, seq, head, d_head]`) -> a replacement or None."
    mod, dh = self.projection(block, letter), self.cfg.d_head
    if self.layout.fused is None:
        view = _heads_view(dh) if letter == "Q" else lambda x: _heads_view(dh)(self.ungroup(x))
        return _out_hook(mod, fn, first, view, _flat)
    i = "QKV".index(letter)
    def on_fused(out):
        pieces = self._letter_slices(out)
        replacement = self._pending.pop((block, letter), None)  # the model projected another input: see hook_projection_inputs
        if replacement is not None: pieces[i] = self.project_letter(block, letter, replacement)
        new = fn(pieces[i])
        if new is None and replacement is None: return None
        pieces[i] = pieces[i] if new is None else new
        return self._fuse(pieces)
    return _out_hook(mod, on_fused, first)

@patch
def project_letter(self: HuggingFaceAdapter, block: int, letter: str, normalized: t.Tensor) -> t.Tensor:
    "Projection `letter` of block `block` of already normalised inputs `[batch, seq, d_model]`: `[batch, seq, head, d_head]`."
    W, bias = self.head_weights(block, letter)
    return t.einsum("bsm,hmd->bshd", normalized, W) + bias

@patch
def add_hook(self: HuggingFaceAdapter, name: str, # a TransformerLens hook name (see the table above)
             fn: Callable, # called as fn(activation) -> new activation or None
             first: bool = True): # run before the hooks already there (or after them)
    "Call `fn` on the activation that TransformerLens calls `name`, in every forward pass; return a removable handle."
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) < self.n_layers:
        b, rest = int(parts[1]), ".".join(parts[2:])
        block = self.block(b)
        if rest == "hook_resid_pre": return _pre_hook(block, fn, first)
        if rest == "attn.hook_z": return _pre_hook(self.attn(b).get_submodule(self.layout.out_proj), fn, first, _heads_view(self.cfg.d_head), _flat)
        if rest == "hook_mlp_out": return _out_hook(block.get_submodule(self.layout.mlp), fn, first)
        if rest == "hook_mlp_in": return _pre_hook(block.get_submodule(self.layout.ln2), fn, first)
        if rest == "hook_resid_post" and b == self.n_layers - 1: return _pre_hook(self.model.get_submodule(self.layout.final_norm), fn, first)
        if rest in ("attn.hook_q", "attn.hook_k", "attn.hook_v"): return self._projection_hook(b, rest[-1].upper(), fn, first)
    raise KeyError(f"the Hugging Face adapter has no hook point {name!r}")

@patch
def hook_projection_inputs(self: HuggingFaceAdapter, block,
                           fn: Callable, # fn(letter, normalized input) -> a replacement, or None to keep it
                          ) -> list:
    "Hook block `block`'s normalised inputs to its Q, K and V projections; return the handles."
    if self.layout.fused is None:
        return [_pre_hook(self.projection(block, l), partial(fn, l), True) for l in "QKV"]
    def on_fused(x):  # one input feeds all three: a replacement for one letter is projected by the output hook
        for letter in "QKV":
            new = fn(letter, x)
            if new is not None and new.shape[0] > 0: self._pending[(block, letter)] = new
        return None
    return [_pre_hook(self.projection(block, "Q"), on_fused, True)]

@patch
def source_output(self: HuggingFaceAdapter, module_name: str, activation: t.Tensor,
                  out: Optional[t.Tensor] = None, # `[n, batch, seq, d_model]` to write into (no autograd), or None
                 ) -> t.Tensor:
    "What the sources at `module_name` write into the residual stream, `[n, batch, seq, d_model]`."
    if module_name.endswith("attn.hook_z"):
        return heads_output(activation, self.out_weights(int(module_name.split(".")[1])), out)
    if out is None: return activation.unsqueeze(0)
    out[0].copy_(activation)
    return out

### CELL: run
@patch
def run(self: HuggingFaceAdapter, tokens, *args, kv_cache=None,
        logits: bool = True, # False: stop after the last block (no final norm, no unembedding), returning the residual stream
        **kwargs):
    "Run the model on token ids `tokens` `[batch, seq]`: its logits `[batch, seq, d_vocab]`, or the residual stream leaving its last block."
    self.check_unchanged()
    if kv_cache is not None: self.check_kv_cache(kv_cache)
    if args or kwargs:
        raise TypeError(f"a wrapped Hugging Face model runs on token ids alone, not with {[*map(repr, args), *kwargs]}")
    if logits: return self.model(input_ids=tokens, use_cache=False).logits
    seen = []
    handle = self.model.get_submodule(self.layout.final_norm).register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # after patching's
    try: self.model.base_model(input_ids=tokens, use_cache=False)
    finally: handle.remove()
    return seen[-1]

@patch
def logits(self: HuggingFaceAdapter, resid: t.Tensor) -> t.Tensor:
    "The logits the model computes from residual-stream vectors `resid` `[..., d_model]` leaving its last block."
    x = self.model.get_submodule(self.layout.final_norm).forward(resid)  # forward: the norm's hooks are patching's
    logits = self.model.get_output_embeddings().forward(x)
    cap = getattr(self.model.config, "final_logit_softcapping", None)
    return cap * t.tanh(logits / cap) if cap else logits

@patch
def check_kv_cache(self: HuggingFaceAdapter, kv_cache):
    "Raise `NotImplementedError`: a shared prefix cache is TransformerLens' (see `prefix_kv_cache`)."
    raise NotImplementedError("kv_caches are TransformerLens key/value caches; a Hugging Face model runs the whole prompts")

### CELL: take over
def _computation(model) -> tuple:
    c = model.config
    return (c.num_hidden_layers, c.num_attention_heads, getattr(c, "num_key_value_heads", None), c.hidden_size,
            getattr(c, "head_dim", None), c._attn_implementation, getattr(c, "use_parallel_residual", None))

@patch
def take_over(self: HuggingFaceAdapter,
              module_names: Sequence[str], # the activations patching hooks (TransformerLens names), other than projected head inputs
              projected_blocks=(), # blocks whose head inputs are patched after their projections
             ):
    "Check that no hook of the user's sits on the model, compute keys and values per query head while wrapped, and freeze the configuration."
    busy = [n or "the model itself" for n, m in self.model.named_modules() if has_hooks(m)]
    if busy:
        raise ValueError(f"the model has hooks on {', '.join(busy[:4])}{' ...' if len(busy) > 4 else ''}, where patching records, replaces "
                         "or cannot see activations: they would see or change something else than the model computes. Remove them "
                         "(their handles' .remove()) before wrapping")
    groups, handles = {}, []
    if self.cfg.n_key_value_heads != self.n_heads:  # each query head's own K and V destinations, as for TransformerLens (01b)
        for b in range(self.n_layers):
            attn = self.attn(b)
            groups[b] = attn.num_key_value_groups
            attn.num_key_value_groups = 1
            handles += [_out_hook(self.projection(b, l), self.ungroup, False) for l in "KV"]
    self._pending = {}
    self._taken = dict(groups=groups, handles=handles, frozen=_computation(self.model))

@patch
def release(self: HuggingFaceAdapter):
    "Undo `take_over`: the model computes exactly what it did before."
    if self._taken is None: return
    for h in self._taken["handles"]: h.remove()
    for b, g in self._taken["groups"].items(): self.attn(b).num_key_value_groups = g
    self._taken = None

@patch
def check_unchanged(self: HuggingFaceAdapter):
    "Raise `RuntimeError` if the configuration changed since `take_over` in a way that changes the forward pass."
    if self._taken is None: return
    if _computation(self.model) != self._taken["frozen"]:
        raise RuntimeError("model.config changed after the model was wrapped; its graph and patching were made for the old "
                           "values: unwrap it and wrap it again")
__all__ = ['HuggingFaceAdapter', 'hf_unsupported_features', 'HFConfigView', 'HFLayout', 'LAYOUTS']
