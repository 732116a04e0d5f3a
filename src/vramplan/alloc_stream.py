"""The ordered allocation/free stream of a language-model workload, for the allocator model.

:mod:`vramplan.estimator` combines identical decoder layers in closed form to get the allocated peak.
What the caching allocator *reserves* depends on the order and the sizes of every allocation, so here the
same recorded programs (:mod:`vramplan.blocks` on a :class:`~vramplan._tape.Tape`) are replayed layer by
layer with event emission, in the order of the calibration harness (``/work/shared/calibration/measure.py``,
which ``vramplan measure`` repeats):

* training: the parameters are created one by one on the device (``from_config`` under
  ``torch.device("cuda")``), peft's adapters after them; then three steps of forward, ``loss.backward()``,
  ``optimizer.step()`` (AdamW creates ``exp_avg``/``exp_avg_sq`` per parameter in the first step, and the
  foreach path's ``torch._foreach_sqrt`` one temporary per parameter), ``zero_grad(set_to_none=True)``, and
  ``del out`` (the logits die after the step); the peaks are reset before the last step;
* inference: the parameters, then the prefill under ``inference_mode`` (the DynamicCache keeps each layer's
  keys and values), ``del out``, and decode steps in which every layer's cache grows by ``torch.cat``
  (a new tensor one token longer, then the old one freed).

The cuBLAS workspaces (32 MiB per handle, ``CublasHandlePool.cpp``) are allocated through the allocator
at the first matmul and kept.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import allocator as A
from ._tape import Tape, Tensor
from .blocks import Numerics, build_embed, build_head, build_layer
from .kinds import Phase
from .memory import ModelStates, lora_targets, quantized_linear_bytes
from .params import attention_linears, count_params, mlp_linears
from .spec import ModelSpec
from .workload import LogitsMode, Method, Optimizer, WeightsQuant, Workload

__all__ = ["infer_events", "train_events"]

Event = tuple[object, int]
MiB = 1 << 20
CUBLAS_WORKSPACE = 32 * MiB
_FREE = A.FREE


def _y(k: object) -> tuple[str, object]:
    return ("y", k)


def _gy(k: object) -> tuple[str, object]:
    return ("gy", k)


class _Template:
    """One recorded block and its event templates; :meth:`instance` maps local keys to global ones."""

    def __init__(self, tp: Tape, x: Tensor | None, y: Tensor | None) -> None:
        self.tp = tp
        self.x = x
        self.y = y

    def instance(self, events: list[Event], tag: object, prev: object, out: object,
                 x_key: object | None = None) -> Iterator[Event]:
        x, y = self.x, self.y
        xk = _y(prev) if x_key is None else x_key
        for key, n in events:
            if isinstance(key, Tensor):
                if key is x:
                    g: object = xk
                elif key is y:
                    g = _y(out)
                else:
                    g = (tag, id(key))
            elif isinstance(key, tuple):
                kind, obj = key
                if kind == "g":
                    if obj is x:
                        g = _gy(prev)
                    elif obj is y:
                        g = _gy(out)
                    else:
                        g = (tag, "g", id(obj))
                else:
                    g = (tag, kind, obj)
            else:  # pragma: no cover - the tape emits only the keys above
                raise TypeError(key)
            yield g, n


class _Stream:
    """Collects events, dropping frees of keys that are not live (a block's input freed by its
    consumer and by the checkpoint) so the stream stays well formed."""

    def __init__(self) -> None:
        self.ev: list[Event] = []
        self.live: dict[object, None] = {}  # insertion-ordered: deterministic frees

    def add(self, items: Iterator[Event] | list[Event]) -> None:
        ev, live = self.ev, self.live
        for key, n in items:
            if n > 0:
                if key in live:
                    continue
                live[key] = None
                ev.append((key, n))
            elif n == _FREE:
                if key in live:
                    del live[key]
                    ev.append((key, n))
            else:
                ev.append((key, n))

    def alloc(self, key: object, n: int) -> None:
        self.add([(key, n)])

    def free(self, key: object) -> None:
        self.add([(key, _FREE)])

    def mark(self, phase: Phase) -> None:
        self.ev.append((phase.value, A.PHASE))


def _param_tensors(spec: ModelSpec, w: Workload, states: ModelStates) -> list[tuple[str, int]]:
    """(group, bytes) of every parameter tensor in construction order; group says which trains."""
    counts = count_params(spec)
    prec = w.precision
    dense = prec.param_bytes
    quant = w.base_quant
    other = 4 if w.method is Method.QLORA else dense
    out: list[tuple[str, int]] = [("embed", counts.embedding * other)]
    h = spec.hidden_size
    for i in range(spec.num_layers):
        moe = i in spec.moe_layers
        layer = counts.layers[i]
        for name, fin, fout, n in attention_linears(spec) + mlp_linears(spec, moe):
            numel = fin * fout * n
            if quant is not WeightsQuant.NONE and name != "router":
                wb, cb = quantized_linear_bytes(numel, fout * n, quant)
                out.append((f"layer{i}", wb))
                out.append((f"layer{i}", cb))
            elif n > 1 and name.startswith("experts."):
                out.append((f"layer{i}", numel * dense))  # fused 3-D expert weights
            else:
                out += [(f"layer{i}", fin * fout * dense)] * n
        if layer.bias:
            out.append((f"layer{i}", layer.bias * other))
        norms = max(1, layer.norm // h) if layer.norm else 0
        out += [(f"layer{i}", layer.norm * other // norms)] * norms
    if counts.final_norm:
        out.append(("head", counts.final_norm * other))
    if counts.lm_head:
        out.append(("head", counts.lm_head * other))
    return out


def _adapters(spec: ModelSpec, w: Workload) -> list[int]:
    if not (w.uses_adapters and w.is_train):
        return []
    targets = lora_targets(spec, w.lora_targets)
    r = w.lora_rank
    out = []
    for i in range(spec.num_layers):
        for name, fin, fout, n in attention_linears(spec) + mlp_linears(spec, i in spec.moe_layers):
            if name in targets:
                out += [r * fin * 4, fout * r * 4] * n  # peft keeps adapters in fp32
    return out


def _trainable(spec: ModelSpec, w: Workload, params: list[tuple[str, int]], adapters: list[int],
               first_trainable: int) -> list[int]:
    if w.uses_adapters:
        return adapters
    if w.method is Method.FULL:
        return [n for _, n in params]
    keep = {f"layer{i}" for i in range(first_trainable, spec.num_layers)} | {"head"}
    return [n for g, n in params if g in keep]


def _optimizer(opt: Optimizer, sizes: list[int]) -> tuple[list[int], list[int]]:
    """(state tensors created in the first step, temporaries of every step), per parameter in order."""
    if opt in (Optimizer.ADAMW, Optimizer.ADAMW_FUSED):
        states = [n for p in sizes for n in (p, p)]  # exp_avg, exp_avg_sq (torch/optim/adamw.py _init_group)
        return states, (list(sizes) if opt is Optimizer.ADAMW else [])  # _foreach_sqrt(exp_avg_sqs)
    if opt is Optimizer.SGD:
        return list(sizes), []  # momentum_buffer = clone(grad)
    if opt is Optimizer.ADAMW_8BIT:
        # bitsandbytes: two uint8 states + fp32 absmax per 256 elements; tensors under 4096 elements fp32.
        # ``sizes`` are bytes in the parameter dtype (2 for the 16-bit runs this optimizer is used with)
        st: list[int] = []
        for p in sizes:
            numel = p // 2
            if numel < 4096:
                st += [numel * 4, numel * 4]
            else:
                st += [numel, 4 * -(-numel // 256), numel, 4 * -(-numel // 256)]
        return st, []
    if opt is Optimizer.ADAFACTOR:
        return [], list(sizes)  # factored moments are tiny; the variance estimate per tensor
    if opt is Optimizer.LION:
        return list(sizes), [max(sizes, default=0)]
    return [], []


def _seeded(items: Iterator[Event], seeds: list[Event]) -> list[Event]:
    """The head's backward with the gradients the tape takes as given: ``loss.backward()`` allocates the
    loss's (a scalar of ones) at once; the logits' gradient is the first gradient of the logits' size that
    backward computes (the cast back from the fp32 loss path), kept until the output projection's backward."""
    out: list[Event] = [e for e in seeds if e[1] <= 512]
    pending = {n: key for key, n in seeds if n > 512}
    renamed: dict[object, object] = {}
    for key, n in items:
        if n > 0 and n in pending:
            renamed[key] = pending.pop(n)
            out.append((renamed[key], n))
        elif n == _FREE and key in renamed:
            continue
        else:
            out.append((key, n))
    for n, key in pending.items():  # never computed: allocated up front as the tape assumes
        out.insert(0, (key, n))
    return out


def train_events(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, steps: int = 3) -> list[Event]:
    from .estimator import _first_trainable, _layer_groups, _plan

    b, s = w.batch_size, w.seq_len
    ckpt = w.gradient_checkpointing
    full = w.method is Method.FULL
    st = _Stream()
    params = _param_tensors(spec, w, states)
    for j, (_, n) in enumerate(params):
        st.alloc(("param", j), n)
    adapters = _adapters(spec, w)
    for j, n in enumerate(adapters):
        st.alloc(("adapter", j), n)
    st.alloc(("ids",), b * s * 8)

    embed_trainable = full
    norm_trainable = full or w.method is Method.FREEZE
    head_trainable = full or (w.method is Method.FREEZE and not spec.tie_word_embeddings)
    layers_rg = full or w.uses_adapters or w.method is Method.FREEZE
    first = _first_trainable(spec, w, states)

    et = Tape(True)
    ex = build_embed(et, spec, num, b, s, embed_trainable, out_rg=full or (w.uses_adapters and ckpt),
                     attention=w.attention)
    emb = _Template(et, None, ex)
    e_fwd: list[Event] = []
    et.forward(ev=e_fwd)
    e_extra = [t for t in et.tensors if t.keep and t is not ex]

    groups = []
    for count, trainable, moe, sliding in _layer_groups(spec, first):
        rg = layers_rg and (trainable or w.method is not Method.FREEZE)
        plan = _plan(spec, w, trainable, rg, moe, sliding)
        tp = Tape(True)
        y = build_layer(tp, spec, num, plan, b, s)
        x = tp.tensors[0]
        c = ckpt and rg
        if c:
            x.keep = True
        fwd: list[Event] = []
        tp.forward(save=not c, ev=fwd)
        rec: list[Event] = []
        if c:
            tp.forward(save=True, ev=rec)
        bwd: list[Event] = []
        tp.backward(False, ev=bwd)
        bwd_acc: list[Event] = []
        if w.gradient_accumulation > 1:
            tp.backward(True, ev=bwd_acc)
        groups.append((count, _Template(tp, x, y), c, fwd, rec, bwd, bwd_acc, bool(x.saved_by)))

    ht = Tape(True)
    logits = build_head(ht, spec, num, b, s, trainable=norm_trainable, head_trainable=head_trainable,
                        input_rg=layers_rg, logits_tokens=b * s, loss=True)
    hx = ht.tensors[0]
    head = _Template(ht, hx, None)
    h_fwd: list[Event] = []
    ht.forward(ev=h_fwd)
    h_bwd: list[Event] = []
    ht.backward(False, ev=h_bwd)
    h_bwd_acc: list[Event] = []
    if w.gradient_accumulation > 1:
        ht.backward(True, ev=h_bwd_acc)
    e_bwd: list[Event] = []
    et.backward(param_grads_exist=spec.tie_word_embeddings and head_trainable, ev=e_bwd)
    e_bwd_acc: list[Event] = []
    if w.gradient_accumulation > 1:
        et.backward(param_grads_exist=True, ev=e_bwd_acc)
    head_kept = [t for t in ht.tensors if t.keep]
    seeds = [t for t in ht.tensors if t.keep and t.rg and not t.external]

    trainable = _trainable(spec, w, params, adapters, first)
    opt_states, opt_temps = _optimizer(w.optimizer, trainable)
    n_layers = spec.num_layers
    first_saves_x = groups[0][7] if groups else True
    micro = min(w.gradient_accumulation, 2)
    st.alloc(("cublas", 0), CUBLAS_WORKSPACE)
    st.alloc(("cublas", 1), CUBLAS_WORKSPACE)

    for step in range(steps):
        before = set(st.live)
        if step == steps - 1:
            st.ev.append((None, A.RESET))
        for mb in range(micro):
            acc = mb > 0
            t = ("s", step, mb)
            st.mark(Phase.FORWARD)
            st.add(emb.instance(e_fwd, (t, "E"), None, (t, -1)))
            k = 0
            for count, tpl, c, fwd, _rec, _bwd, _bacc, _saves in groups:
                for _ in range(count):
                    items = list(tpl.instance(fwd, (t, k), (t, k - 1), (t, k)))
                    if k == 0 and not first_saves_x and not c:
                        # transformers' base model keeps inputs_embeds referenced until it returns
                        items = [(kk, n) for kk, n in items if not (n == _FREE and kk == _y((t, -1)))]
                    st.add(items)
                    k += 1
            if not first_saves_x and not (groups and groups[0][2]):
                st.free(_y((t, -1)))
            st.add(head.instance(h_fwd, (t, "H"), (t, n_layers - 1), (t, "H")))
            st.mark(Phase.BACKWARD)
            st.add(_seeded(head.instance(h_bwd_acc if acc else h_bwd, (t, "H"), (t, n_layers - 1), (t, "H")),
                           [(((t, "H"), "g", id(sd)), sd.nbytes) for sd in seeds]))
            k = n_layers - 1
            for count, tpl, c, _fwd, rec, bwd, bacc, _saves in reversed(groups):
                for _ in range(count):
                    tag: object = (t, k)
                    if c:
                        tag = (t, "r", k)
                        st.add(tpl.instance(rec, tag, (t, k - 1), (t, "r", k)))
                        st.free(_y((t, "r", k)))
                    st.add(tpl.instance(bacc if acc else bwd, tag, (t, k - 1), (t, k)))
                    if c:
                        st.free(_y((t, k - 1)))
                    k -= 1
            st.add(emb.instance(e_bwd_acc if acc else e_bwd, (t, "E"), None, (t, -1)))
            for tt in e_extra:
                st.free(((t, "E"), id(tt)))
            st.free(_y((t, -1)))
            if micro > 1 and not acc:
                # the next micro-batch's output replaces this one's (the harness drops ``out`` each time)
                for kt in head_kept:
                    st.free(((t, "H"), id(kt)))
        st.mark(Phase.OPTIMIZER_STEP)
        if step == 0:
            for j, n in enumerate(opt_states):
                st.alloc(("opt", j), n)
        for j, n in enumerate(opt_temps):
            st.alloc(("tmp", step, j), n)
        for j in range(len(opt_temps)):
            st.free(("tmp", step, j))
        # zero_grad(set_to_none=True): every gradient buffer dies (in parameter order, the reverse of
        # backward's); then ``del out`` drops the logits and the loss, and with them the step's graph
        new = [kk for kk in st.live if kk not in before]
        grads = [kk for kk in new if isinstance(kk, tuple) and len(kk) == 3 and kk[1] == "p"]
        for kk in reversed(grads):
            st.free(kk)
        for kk in new:
            if not (isinstance(kk, tuple) and kk[0] == "opt"):
                st.free(kk)
    return st.ev


def infer_events(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics) -> list[Event]:
    from .estimator import _kv_bytes, _layer_groups, _plan

    b, s = w.batch_size, w.seq_len
    st = _Stream()
    for j, (_, n) in enumerate(_param_tensors(spec, w, states)):
        st.alloc(("param", j), n)
    st.alloc(("ids",), b * s * 8)
    st.ev.append((None, A.RESET))
    st.mark(Phase.PREFILL)
    et = Tape(False)
    ex = build_embed(et, spec, num, b, s, False, out_rg=False, attention=w.attention)
    emb = _Template(et, None, ex)
    e_fwd: list[Event] = []
    et.forward(ev=e_fwd)
    st.add(emb.instance(e_fwd, "E", None, -1))
    st.alloc(("cublas", 0), CUBLAS_WORKSPACE)
    k = 0
    kv_keys: list[list[object]] = []
    for count, _tr, moe, sliding in _layer_groups(spec, spec.num_layers):
        tp = Tape(False)
        y = build_layer(tp, spec, num, _plan(spec, w, False, False, moe, sliding), b, s)
        x = tp.tensors[0]
        tpl = _Template(tp, x, y)
        fwd: list[Event] = []
        tp.forward(ev=fwd)
        kept = [t for t in tp.tensors if t.keep and t is not y]
        for _ in range(count):
            items = list(tpl.instance(fwd, k, k - 1, k))
            if k == 0:
                items = [(kk, n) for kk, n in items if not (n == _FREE and kk == _y(-1))]
            st.add(items)
            kv_keys.append([(k, id(t)) for t in kept])
            k += 1
    st.free(_y(-1))
    ht = Tape(False)
    last = w.logits is LogitsMode.LAST
    build_head(ht, spec, num, b, s, trainable=False, input_rg=False, logits_tokens=b if last else b * s,
               loss=False)
    head = _Template(ht, ht.tensors[0], None)
    h_fwd: list[Event] = []
    ht.forward(ev=h_fwd)
    st.add(head.instance(h_fwd, "H", spec.num_layers - 1, "H"))
    for t in et.tensors:
        if t.keep:
            st.free(("E", id(t)))
    st.free(_y(spec.num_layers - 1))
    for t in ht.tensors:  # del out: the logits die, the cache lives on
        if t.keep:
            st.free(("H", id(t)))
    if not w.new_tokens:
        return st.ev
    st.mark(Phase.DECODE)
    h = spec.hidden_size
    small = [b * h * 4, b * spec.intermediate_size * num.act, b * spec.vocab_size * num.act]
    for step in range(w.new_tokens):
        length = s + step + 1
        for j, n in enumerate(small[:2]):
            st.alloc(("dec", step, j), n)
        for i in range(spec.num_layers):
            per = _kv_bytes(spec, num, b, length, i in spec.sliding_layers) // 2
            for j, old in enumerate(kv_keys[i]):
                new = ("kv", step, i, j)
                st.alloc(new, per)
                st.free(old)
                kv_keys[i][j] = new
        st.alloc(("dec", step, 2), small[2])
        for j in range(3):
            st.free(("dec", step, j))
    return st.ev
