"""The functional check of a canonical map: do its views compute what the model computes?

``check_map(mm)`` proves block 0 of a ``ModelMap`` against the model itself, and raises a one-line
``ImpruneError`` naming the model type and ``register_arch`` where it does not hold:

1. shapes agree: q rows = heads x head_dim = o columns, k and v rows alike, heads a multiple of KV heads,
   gate rows = up rows = down columns (a fused gate|up mapped as ``mlp.up`` fails here);
2. every linear view reproduces its slice of the module's output (``x @ view.T + bias``);
3. the MLP module, called on the input it got in a real forward, changes by exactly
   ``down(act(gate x) * up x)`` when the down view is zeroed (``down(act(up x))`` without a gate): gate and
   up are the right rows, in the right order, and nothing else happens between them;
4. every mapped linear runs in a real forward (a decoder's unused cross-attention does not);
5. with the value view zeroed, the attention hands ``attn.o`` exactly zeros: the rows mapped as v are the
   values the heads mix (an interleaved fused q|k|v read as blocks fails here);
6. expert 0 of stacked experts equals ``down_0(g(gate_0 x, up_0 x))`` of its views, with the module's own gate
   function ``g`` (``act(gate) * up``; gpt_oss's clamped ``(up + 1) * glu(gate)``), affine in the up rows.

(3) compares the MLP module's output with one of its own outputs, so a residual added inside the module
(BLOOM) cancels; (5) looks at the input of ``attn.o``, before any residual or post-norm. The real inputs
come from one forward over a few tokens that stops after block 0.
Discovered maps are checked before anything uses them; the test grid checks every registered map.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from importance.arch import experts
from importance.arch.canonical import Block, Component, ModelMap
from importance.errors import ImpruneError

_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation", "gelu_impl", "activation_function")
_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


class _Stop(Exception):
    """Raised from block 0's forward hook: the rest of the forward is not needed."""


def _fail(mm: ModelMap, what: str) -> ImpruneError:
    return ImpruneError(f"model type '{mm.model_type}': {what}; register a correct mapping with "
                        "importance.arch.register_arch")


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to float rounding, relative to the reference's own scale (random models have tiny outputs)."""
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return got.shape == ref.shape and torch.allclose(got.detach().float(), ref.detach().float(), rtol=1e-3,
                                                     atol=1e-4 * scale + 1e-9)


def check_shapes(mm: ModelMap, block: Block) -> None:
    c = block.components
    if "attn.q" in c and "attn.o" in c:
        (q, dq), (o, do) = ((c[n].shape, c[n].head_dim) for n in ("attn.q", "attn.o"))
        if q[0] != block.n_heads * dq or o[1] != block.n_heads * do:
            raise _fail(mm, f"attn.q has {q[0]} rows and attn.o {o[1]} columns, not heads x head_dim = "
                        f"{block.n_heads} x {dq}" + (f" / {do}" if do != dq else ""))
    if "attn.k" in c and "attn.v" in c:
        (k, dk), (v, dv) = ((c[n].shape, c[n].head_dim) for n in ("attn.k", "attn.v"))
        if k[1] != v[1] or k[0] % dk or v[0] // dv != k[0] // dk or (dk == dv and k != v) or \
                not block.n_kv_heads or block.n_heads % block.n_kv_heads:
            raise _fail(mm, f"attn.k {list(k)} / attn.v {list(v)} do not form KV heads of {dk} serving "
                        f"{block.n_heads} query heads")
    if "mlp.up" in c and "mlp.down" in c:
        up, down = c["mlp.up"].shape[0], c["mlp.down"].shape[1]
        gate = c["mlp.gate"].shape[0] if "mlp.gate" in c else up
        if not up == down == gate:
            raise _fail(mm, f"mlp.up has {up} rows{f', mlp.gate {gate}' if 'mlp.gate' in c else ''} but mlp.down "
                        f"{down} columns (a fused gate|up module mapped as one component?)")


def _out_width(comp: Component) -> int:
    w = getattr(comp.module, comp.param)
    return int(w.shape[0] if not comp.transposed else w.shape[1])


def _same(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return ref.numel() == got.numel() and _close(got, ref.reshape(got.shape))


def check_linear_views(mm: ModelMap, block: Block, tokens: int = 3,
                       calls: dict[str, tuple[tuple, dict]] | None = None) -> None:
    """``x @ view.T + bias`` equals the module's output rows on random inputs; a module that takes more than its
    input (a router handed its score-correction bias) gets the other arguments of its real call."""
    with torch.no_grad():
        for comp in block.components.values():
            if comp.kind != "linear":
                continue
            w = comp.weight
            x = torch.randn(tokens, w.shape[1], dtype=w.dtype, device=w.device)
            args, kwargs = (calls or {}).get(comp.name, ((), {}))
            try:
                y = comp.module(x)
            except TypeError:
                if not args:
                    raise
                y = comp.module(x, *args[1:], **kwargs)
            got = x @ w.T + (comp.bias if comp.bias is not None else 0)
            # routers return (logits, ...), or (scores, logits) (llama4): one of the outputs must be the view's
            outs = [o for o in (y if isinstance(y, tuple) else (y,)) if isinstance(o, torch.Tensor)]
            if not any(_same(got, comp.select_out(o)) for o in outs if o.shape[-1] == _out_width(comp)):
                raise _fail(mm, f"the view of {comp.name} ({comp.path}) does not reproduce the module's output")


@contextlib.contextmanager
def zeroed(comp: Component) -> Iterator[None]:
    """``comp``'s weight view and bias rows are zero inside the block, restored after it."""
    saved = comp.weight.detach().clone()
    bias = getattr(comp.module, "bias", None) if comp.kind == "linear" else None
    rows = None
    if isinstance(bias, torch.Tensor):
        rows = torch.arange(bias.shape[0])[comp.rows] if comp.rows is not None else torch.arange(bias.shape[0])
        saved_b = bias.detach()[rows].clone()
    try:
        with torch.no_grad():
            comp.update_weight_(torch.zeros_like)
            if rows is not None:
                bias[rows] = 0
        yield
    finally:
        with torch.no_grad():
            comp.update_weight_(lambda _w: saved)
            if rows is not None:
                bias[rows] = saved_b


def capture_calls(mm: ModelMap, modules: dict[str, nn.Module], upto: int = 0) -> dict[str, tuple[tuple, dict]]:
    """(args, kwargs) of each module's first call in a real forward of a few tokens that stops after block
    ``upto``."""
    from importance.models.load import input_device

    seen: dict[str, tuple[tuple, dict]] = {}

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault(name, (args, dict(kwargs)))
        return hook

    def stop(*_a: Any) -> None:
        raise _Stop

    handles = [m.register_forward_pre_hook(pre(n), with_kwargs=True) for n, m in modules.items()]
    handles.append(mm.blocks[upto].module.register_forward_hook(stop))
    emb = mm.model.get_input_embeddings() if hasattr(mm.model, "get_input_embeddings") else None
    vocab = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else 16
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (1, 6), generator=gen).to(input_device(mm.model))
    try:
        with torch.no_grad():
            mm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Stop:
        pass
    except Exception as err:  # the model's own forward: nothing to check against
        msg = (str(err).strip().splitlines() or [""])[0][:200]
        raise ImpruneError(f"model type '{mm.model_type}': its own forward fails on {ids.shape[1]} tokens, so the "
                           f"map cannot be checked ({type(err).__name__}: {msg})") from None
    finally:
        for h in handles:
            h.remove()
    return seen


def _activations(mm: ModelMap, mlp: nn.Module) -> list[Any]:
    """The MLP's activation: its own attribute, else the config's; where neither names one (LFM2 calls F.silu in
    its forward), the common ones to try: the check below accepts only one that reproduces the module exactly."""
    from transformers.activations import ACT2FN

    for a in _ACT_ATTRS:
        fn = getattr(mlp, a, None)
        if callable(fn) and not isinstance(fn, (nn.Linear, type)):
            return [fn]
    cfg = mm.model.config
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or \
        getattr(cfg, "activation_function", None)
    if isinstance(name, str) and name in ACT2FN:
        return [ACT2FN[name]]
    return [ACT2FN[n] for n in ("silu", "gelu", "gelu_pytorch_tanh", "relu")]


def _lin(comp: Component, h: torch.Tensor) -> torch.Tensor:
    return h @ comp.weight.T.to(h.dtype) + (comp.bias if comp.bias is not None else 0)


def check_mlp(mm: ModelMap, block: Block, call: tuple[tuple, dict], mlp: nn.Module) -> None:
    c = block.components
    args, kwargs = call
    x = args[0] if args else next(iter(kwargs.values()))
    with torch.no_grad():
        y = _out(mlp(*args, **kwargs))
        with zeroed(c["mlp.down"]):
            y0 = _out(mlp(*args, **kwargs))
        up = _lin(c["mlp.up"], x)
        hiddens = [act(_lin(c["mlp.gate"], x)) * up if "mlp.gate" in c else act(up) for act in _activations(mm, mlp)]
        if any(_close(y - y0, _lin(c["mlp.down"], h)) for h in hiddens):
            return
        if _sub_norm(mlp, call, c, hiddens):
            return
    raise _fail(mm, f"down(act(gate x) * up x) from the views does not reproduce the MLP module "
                f"({block.path}.{mm.spec.mlp}): gate / up rows or order of a layout imprune does not know")


def _sub_norm(mlp: nn.Module, call: tuple[tuple, dict], c: dict[str, Component], hiddens: list[torch.Tensor]) -> bool:
    """Whether a module inside the MLP takes ``act(gate x) * up x`` and hands its output to ``mlp.down`` (BitNet's
    ffn_sub_norm): then gate, up and the activation are still proven, the norm in between is left unmapped."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mapped = {id(comp.module) for comp in c.values()}
    def record(name: str) -> Any:
        def hook(_m: nn.Module, a: tuple, out: Any) -> None:
            if a and name not in seen:
                seen[name] = (a[0], _out(out))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in mlp.named_modules()
             if n and id(m) not in mapped and _has_params(m)]
    into_down: list[torch.Tensor] = []
    hooks.append(c["mlp.down"].module.register_forward_pre_hook(lambda _m, a: into_down.append(a[0])))
    args, kwargs = call
    try:
        mlp(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return bool(into_down) and any(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and _close(y, into_down[0]) and
        any(_close(x, h) for h in hiddens) for x, y in seen.values())


def _has_params(m: nn.Module) -> bool:
    """A module with parameters of its own (a norm), not an activation or a container."""
    return any(True for _ in m.parameters(recurse=False))


def check_attention(mm: ModelMap, block: Block, call: tuple[tuple, dict], attn: nn.Module) -> None:
    """With the v view zeroed, the attention hands attn.o exactly zeros (whatever the residuals, norms or biases
    around it): the rows mapped as v are the values the heads mix."""
    c = block.components
    args, kwargs = call
    seen: list[torch.Tensor] = []
    hook = c["attn.o"].module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            attn(*args, **kwargs)
            with zeroed(c["attn.v"]):
                attn(*args, **kwargs)
    finally:
        hook.remove()
    if len(seen) != 2:
        raise _fail(mm, f"attn.o ({c['attn.o'].path}) does not run once per call of {block.path}.{mm.spec.attn}")
    if "attn.gate" in c:
        check_gate(mm, block, call, attn)
    if not _close(seen[1], torch.zeros_like(seen[1])) or not float(seen[1].abs().max()) <= 1e-6 * max(
            float(seen[0].abs().max()), 1e-30):
        raise _fail(mm, f"with the attn.v view zeroed the attention ({block.path}.{mm.spec.attn}) still mixes "
                    "values: the rows mapped as v are not the values (a fused q|k|v layout imprune does not know)")


def check_gate(mm: ModelMap, block: Block, call: tuple[tuple, dict], attn: nn.Module) -> None:
    """An output gate ``o_in = attn * sigmoid(gate x)``: with the gate view zeroed (sigmoid 1/2) the input of
    ``attn.o`` times ``sigmoid(gate x)`` (x: the gate module's real input) is half the gated one."""
    c = block.components
    args, kwargs = call
    seen: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    hooks = [c["attn.o"].module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach())),
             c["attn.gate"].module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))]
    try:
        with torch.no_grad():
            attn(*args, **kwargs)
            with zeroed(c["attn.gate"]):
                attn(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    gate = torch.sigmoid(_lin(c["attn.gate"], xs[0]).float())
    if len(seen) != 2 or not _close(seen[1].float() * gate, 0.5 * seen[0].float()):
        raise _fail(mm, f"the rows mapped as attn.gate ({c['attn.gate'].path}) are not a sigmoid gate on the heads' "
                    "output (a q|gate layout imprune does not know)")


def check_experts(mm: ModelMap, block: Block) -> None:
    """Expert 0 of the stacked experts module, called with every token routed to it alone (weight 1), equals
    ``down_0(g(gate_0 x + b, up_0 x + b)) + b`` from the expert views and the module's own gate function ``g``
    (``act(gate) * up`` by default); and ``g`` is affine in the rows mapped as up (swapped or misread gate / up
    rows are not)."""
    c = block.components
    gate, up, down = (c[f"mlp.experts.{n}"] for n in ("gate", "up", "down"))
    mod = down.module
    layout = experts.expert_layout(mod)
    w = gate.weight
    x = torch.randn(5, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w)
    try:
        with torch.no_grad():
            y = _out(mod(x, torch.zeros(5, 1, dtype=torch.long, device=w.device), torch.ones(5, 1).to(w)))
    except Exception as err:
        raise _fail(mm, f"the stacked experts {type(mod).__name__} do not run as experts(hidden, top_k_index, "
                    f"top_k_weights) ({type(err).__name__})") from None
    with torch.no_grad():
        b_gu = mod.gate_up_proj_bias[0].float() if layout.bias else torch.zeros(2 * w.shape[1]).to(x)
        b_g, b_u = experts.split(layout, b_gu)
        g, u = x.float() @ gate.weight[0].float().T + b_g, x.float() @ up.weight[0].float().T + b_u
        h = experts.hidden(mod, experts.join(layout, g, u))
        ref = h @ down.weight[0].float().T + (mod.down_proj_bias[0].float() if layout.bias else 0)
        u = u / (1 + float(u.abs().max()))  # |up| < 1: inside any clamp of the gate function (gpt_oss: 7)
        h1, h2, h0 = (experts.hidden(mod, experts.join(layout, g, s * u)) for s in (1.0, 2.0, 0.0))
    if not _close(y, ref):
        raise _fail(mm, f"expert 0 of {type(mod).__name__} is not down(g(gate x, up x)) of its views (a "
                    "transposed, interleaved or biased expert layout imprune does not know)")
    if not _close(h2 - h1, h1 - h0):
        raise _fail(mm, f"the gate function of {type(mod).__name__} is not affine in the rows mapped as up: "
                    "gate and up rows are swapped or misread")


def representative_blocks(mm: ModelMap) -> list[Block]:
    """Block 0, and in a hybrid (blocks without attention, or without a dense MLP) the first block with attention
    and the first with an MLP: each layout a block of the model has, once."""
    picks = [mm.blocks[0]]
    for has in (lambda b: "attn.o" in b.components, lambda b: "mlp.down" in b.components,
                lambda b: "mlp.experts.down" in b.components):
        if not any(has(b) for b in picks):
            picks += [b for b in mm.blocks if has(b)][:1]
    return sorted(picks, key=lambda b: b.index)


def _signature(mm: ModelMap) -> tuple:
    return (mm.model_type, repr(mm.spec), tuple((b.index, tuple((c.name, c.shape) for c in b.components.values()))
                                                for b in representative_blocks(mm)))


def check_map(mm: ModelMap) -> None:
    """Run every check on block 0 and, in a hybrid, on the first block of each other layout (once per model and
    shape; see the module docstring)."""
    try:
        _check_map(mm)
    except ImpruneError:
        raise
    except Exception as err:  # a view that does not even fit its module
        msg = (str(err).strip().splitlines() or [""])[0][:200]
        raise _fail(mm, f"the functional check cannot run the views ({type(err).__name__}: {msg})") from None


def _check_map(mm: ModelMap) -> None:
    if not mm.blocks:
        raise _fail(mm, "no blocks")
    sig = _signature(mm)
    if _CHECKED.get(mm.model) == sig:
        return
    blocks = representative_blocks(mm)
    mods: dict[int, dict[str, nn.Module]] = {}
    for block in blocks:
        c = block.components
        check_shapes(mm, block)
        mlp = block.module.get_submodule(mm.spec.mlp) if mm.spec.mlp and "mlp.down" in c and "mlp.up" in c else None
        attn = block.module.get_submodule(mm.spec.attn) if "attn.v" in c and "attn.o" in c else None
        if mlp is not None and any(n.startswith("mlp.experts") for n in c):
            mlp = None  # the dense MLP and the experts share the module: the expert views have their own test
        mods[block.index] = {**{k: m for k, m in (("mlp", mlp), ("attn", attn)) if m is not None},
                             **{n: comp.module for n, comp in c.items() if comp.kind == "linear"}}
    calls = capture_calls(mm, {f"{i}:{k}": m for i, ms in mods.items() for k, m in ms.items()},
                          upto=blocks[-1].index)
    for block in blocks:
        c = block.components
        got = {k.split(":", 1)[1]: v for k, v in calls.items() if k.startswith(f"{block.index}:")}
        check_linear_views(mm, block, calls=got)
        idle = [f"{n} ({c[n].path})" for n in mods[block.index] if n in c and n not in got]
        if idle:
            raise _fail(mm, f"{', '.join(idle[:3])} never run in a forward of the model")
        if "mlp" in got:
            check_mlp(mm, block, got["mlp"], mods[block.index]["mlp"])
        if "attn" in got:
            check_attention(mm, block, got["attn"], mods[block.index]["attn"])
        if "mlp.experts.down" in c:
            check_experts(mm, block)
    _CHECKED[mm.model] = sig
