"""The ordered allocation/free stream of a language-model workload, for the allocator model.

:mod:`vramplan.estimator` combines identical decoder layers in closed form to get the allocated peak.
What the caching allocator *reserves* depends on the order and the sizes of every allocation, so here the
same recorded programs (:mod:`vramplan.blocks` on a :class:`~vramplan._engine.tape.Tape`) are replayed layer by
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

import itertools
import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from . import allocator as A
from ._engine.loop import training_steps
from ._engine.replay import Event, GradBuf, layer_backward, layer_forward
from ._engine.step import CUBLAS_WORKSPACE_BYTES as CUBLAS_WORKSPACE
from ._engine.tape import Tape, Tensor, root
from .blocks import Numerics, build_embed, build_head, build_layer
from .kinds import MemoryKind, Phase
from .memory import ModelStates, effective_quantization, linear_scheme, lora_targets, quantized_linear_bytes
from .params import LayerParams, attention_linears, count_params, mlp_linears, no_grad_linears
from .spec import ATTENTION_MIXERS, ModelSpec
from .workload import Attention, LogitsMode, Loss, Method, Optimizer, Trainer, WeightsQuant, Workload

if TYPE_CHECKING:
    from .quant import LinearQuant, Quantization

__all__ = ["infer_events", "train_events"]

MiB = 1 << 20
_FREE = A.FREE
_KIND_OF = tuple(MemoryKind)  # Tensor.kind indexes MemoryKind (vramplan._engine.tape)


def _y(k: object) -> tuple[str, object]:
    return ("y", k)


def _gy(k: object) -> tuple[str, object]:
    return ("gy", k)


class _Template:
    """One recorded block; :meth:`compile` turns an event list of its tape into integer codes
    (-1 input, -2 output, -3 input gradient, -4 output gradient, >= 0 the block's own tensors) and
    :meth:`instance` maps the codes of one instance of the block to global integer keys."""

    def __init__(self, tp: Tape, x: Tensor | None, y: Tensor | None) -> None:
        self.tp = tp
        self.x = x
        self.y = y
        self.local: dict[object, int] = {}
        self.pgrads: set[int] = set()  # codes of parameter gradients (kept until zero_grad)

    def compile(self, events: list[Event]) -> list[tuple[int, int]]:
        x, y, local = self.x, self.y, self.local
        # an output that is a view (Gemma 3n's ``corrected[1:] += ...`` returns the stack it wrote into) lives in its
        # base's storage: the base's allocation is the output's, freed by the consumer as the output
        y_root = root(y) if y is not None else None
        out = []
        for key, n in events:
            if isinstance(key, Tensor) and (key is x or key is y or key is y_root):
                code = -1 if key is x else -2
            elif isinstance(key, GradBuf) and (key.owner is x or key.owner is y):
                code = -3 if key.owner is x else -4
            else:
                ident = ("g", id(key.owner)) if isinstance(key, GradBuf) else key if isinstance(key, tuple) else id(key)
                code = local.setdefault(ident, len(local))
            if isinstance(key, tuple) and key[0] == "p" and code >= 0:
                self.pgrads.add(code)
            out.append((code, n))
        return out

    @staticmethod
    def instance(codes: list[tuple[int, int]], base: int, xk: int, yk: int, gxk: int,
                 gyk: int) -> list[Event]:
        special = (0, xk, yk, gxk, gyk)  # indexed by -code
        return [(special[-c] if c < 0 else base + c, n) for c, n in codes]


class _Stream:
    """Collects events, dropping frees of keys that are not live (a block's input freed by its
    consumer and by the checkpoint) so the stream stays well formed."""

    def __init__(self) -> None:
        self.ev: list[Event] = []
        self.live: dict[object, None] = {}  # insertion-ordered: deterministic frees
        self._keys: dict[object, int] = {}
        self.opt_keys: set[int] = set()
        self._next = 1 << 40
        self._codes: dict[int, tuple[list[tuple[int, int]], list[int], dict[int, int], list[tuple[int, int]]]] = {}
        self._plans: dict[tuple[object, ...], _Plan] = {}

    def key(self, tag: object) -> int:
        """The integer key of a named tensor (a block's output, its gradient, a parameter)."""
        k = self._keys.get(tag)
        if k is None:
            k = self._keys[tag] = len(self._keys)
        return k

    def fresh(self, n: int) -> int:
        """A base for ``n`` new integer keys."""
        base = self._next
        self._next += n + 1
        return base

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

    def add_instance(self, codes: list[tuple[int, int]], base: int, xk: int, yk: int, gxk: int, gyk: int) -> None:
        """``add(_Template.instance(codes, base, xk, yk, gxk, gyk))``, the same events and the same ``live`` order,
        without a dictionary test per event: which events :meth:`add` drops, and what the instance leaves in
        ``live``, depend only on the codes and on which of the instance's keys are live when it starts (and on which
        of them coincide), so they are worked out once per such case (a stack of identical layers repeats them)."""
        info = self._codes.get(id(codes))
        if info is None:
            distinct = list(dict.fromkeys(c for c, _ in codes))
            info = self._codes[id(codes)] = (codes, distinct, {c: i for i, c in enumerate(distinct)},
                                             [(i, -c) for i, c in enumerate(distinct) if c < 0])
        keys = list(map(base.__add__, info[1]))  # the block's own tensors: base + code
        if info[3]:
            special = (0, xk, yk, gxk, gyk)  # indexed by -code
            for i, c in info[3]:
                keys[i] = special[c]
        live = self.live
        state = tuple(map(live.__contains__, keys))
        canon = None if len(set(keys)) == len(keys) else tuple([keys.index(k) for k in keys])
        memo_key = (id(codes), state, canon)
        plan = self._plans.get(memo_key)
        if plan is None:
            plan = self._plans[memo_key] = _Plan(*_instance_plan(codes, info[2], state, canon))
        self.ev.extend(zip(plan.kept_keys(keys), plan.kept_sizes, strict=True))
        for i in plan.deleted:
            del live[keys[i]]
        if plan.appended:
            live.update(dict.fromkeys(plan.appended_keys(keys)))

    def alloc(self, key: object, n: int) -> None:
        """``add([(key, n)])``."""
        if n > 0:
            if key in self.live:
                return
            self.live[key] = None
        self.ev.append((key, n))

    def free(self, key: object) -> None:
        """``add([(key, FREE)])``."""
        if key in self.live:
            del self.live[key]
            self.ev.append((key, _FREE))

    def mark(self, phase: Phase) -> None:
        self.ev.append((phase.value, A.PHASE))


def _picker(positions: list[int]) -> Callable[[list[int]], tuple[int, ...]]:
    """A function that takes the items at ``positions`` of a list, as a tuple, in one call."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        i = positions[0]
        return lambda keys: (keys[i],)
    return lambda keys: ()


class _Plan:
    """:func:`_instance_plan`'s answer in the form :meth:`_Stream.add_instance` applies it: the kept events' keys
    taken from an instance's key list in one call, and their sizes."""

    __slots__ = ("appended", "appended_keys", "deleted", "kept_keys", "kept_sizes")

    def __init__(self, kept: list[tuple[int, int]], deleted: list[int], appended: list[int]) -> None:
        self.kept_keys = _picker([i for i, _ in kept])
        self.kept_sizes = [n for _, n in kept]
        self.deleted = deleted
        self.appended = appended
        self.appended_keys = _picker(appended)


def _instance_plan(codes: list[tuple[int, int]], index: dict[int, int], state: tuple[bool, ...],
                   canon: tuple[int, ...] | None) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """What :meth:`_Stream.add` does with one instance of ``codes`` whose distinct keys (``index``: code -> position)
    are live as ``state`` says (``canon``: the first position of each key, where keys coincide): the events it keeps
    as (position, n), the positions of keys live before that it deletes from ``live``, and the positions of keys it
    leaves live, in the order of their last insertion."""
    live = {i for i, s in enumerate(state) if s and (canon is None or canon[i] == i)}
    start = set(live)
    kept: list[tuple[int, int]] = []
    deleted: list[int] = []
    inserted: dict[int, None] = {}
    for c, n in codes:
        i = index[c] if canon is None else canon[index[c]]
        if n > 0:
            if i in live:
                continue
            live.add(i)
            inserted.pop(i, None)
            inserted[i] = None
            kept.append((i, n))
        elif n == _FREE:
            if i in live:
                live.discard(i)
                inserted.pop(i, None)
                if i in start and i not in deleted:
                    deleted.append(i)
                kept.append((i, n))
        else:
            kept.append((i, n))
    return kept, deleted, list(inserted)


def _layer_linears(spec: ModelSpec, quantization: Quantization | None, i: int,
                   layer: LayerParams) -> list[tuple[str, int, int, int, LinearQuant | None]]:
    """Layer ``i``'s linear kinds (``LayerParams.linear_shapes``) as the Parameters transformers 5 builds, each with
    its quantization scheme (:func:`vramplan.memory.linear_scheme`, None: 16 bits): an MoE layer's unquantized
    experts are one ``gate_up_proj`` (experts, 2 x intermediate, hidden) stack (``MixtralExperts``,
    ``Qwen3MoeExperts``, ``DeepseekV2Experts``... 71 modeling files of 5.25) where
    :func:`vramplan.params.mlp_linears` lists gate and up apart (adapter targets)."""
    out: list[tuple[str, int, int, int, LinearQuant | None]] = []
    for j, (name, fin, fout, n) in enumerate(layer.linear_shapes):
        scheme = None if quantization is None else linear_scheme(spec, quantization, i, j, name)
        prev = out[-1] if out else None
        if scheme is None and n > 1 and name == "experts.up_proj" and prev is not None and \
                prev[0] == "experts.gate_proj" and prev[1:] == (fin, fout, n, None):
            out[-1] = ("experts.gate_up_proj", fin, 2 * fout, n, None)
        else:
            out.append((name, fin, fout, n, scheme))
    return out


def _param_tensors(spec: ModelSpec, w: Workload, states: ModelStates) -> list[tuple[str, int]]:
    """(group, bytes) of every parameter tensor in construction order; group says which trains. Each layer's own
    linears (``LayerParams.linear_shapes``: its mixer's, attention or Mamba or convolution, and its MLP's, the
    experts as the Parameters transformers 5 builds), quantized as the model states count them
    (:func:`vramplan.memory.linear_scheme`), its biases and norms, and its other parameters (an SSM's ``A_log``,
    ``D``, convolution) as one tensor."""
    counts = count_params(spec)
    prec = w.precision
    dense = prec.param_bytes
    other = 4 if w.method is Method.QLORA else dense
    # (DeepSeek-V4's fine-grained FP8 layout is sized by its own reader: the total below scales it)
    quantization = None if spec.dsv4 else effective_quantization(spec, w)
    out: list[tuple[str, int]] = [("embed", counts.embedding * other)]
    h = spec.hidden_size
    for i in range(spec.num_layers):
        layer = counts.layers[i]
        g = f"layer{i}"
        linear = sum(fin * fout * n for _, fin, fout, n in layer.linear_shapes)
        for name, fin, fout, n, scheme in _layer_linears(spec, quantization, i, layer):
            if scheme is not None:
                wb, cb = scheme.bytes(fin, fout)
                out += [(g, wb), (g, cb)] * n if cb else [(g, wb)] * n
            elif n > 1 and name.startswith("experts."):
                out.append((g, fin * fout * n * dense))  # fused 3-D expert weights
            else:
                out += [(g, fin * fout * dense)] * n
        if layer.bias:
            out.append((g, layer.bias * other))
        norms = max(1, layer.norm // h) if layer.norm else 0  # 0: parameter-free norms (OLMo)
        if norms:
            out += [(g, layer.norm * other // norms)] * norms
        rest = layer.total - linear - layer.bias - layer.norm
        if rest > 0:
            out.append((g, rest * other))
    if counts.final_norm:
        out.append(("head", counts.final_norm * other))
    if counts.lm_head:
        out.append(("head", counts.lm_head * other))
    # the tensors above follow --weights-quant; a checkpoint's own quantization (and any layout detail the
    # list does not know) is taken from the model states' total: scale every tensor to it
    target = states.weights + states.master_weights + states.quant_constants - \
        (sum(_adapters(spec, w)) if w.uses_adapters and w.is_train else 0)
    total = sum(n for _, n in out)
    if target > 0 and total and abs(target - total) > total // 100:
        out = [(g, n * target // total) for g, n in out]
    return out


def _bnb_tensors(spec: ModelSpec, w: Workload) -> list[tuple[object, int, int, str]]:
    """The tensors of a model that bitsandbytes 4-bit quantizes, in construction order: (tag, 16-bit elements,
    out_features of a linear it quantizes or 0 for a tensor that stays in 16 bits, the module name for the
    checkpoint-key order). Which linears are quantized is what the model states count
    (:func:`vramplan.memory.linear_scheme`): every ``nn.Linear`` of the decoder layers (their own mixer's: attention,
    Mamba, convolution) but the routers; a transformers 5 MoE layer's fused 3-D expert stack is an ``nn.Parameter``
    and stays (one tensor). A layer's parameters beyond its linears, biases and norms (an SSM's ``A_log``, ``D``,
    convolution) are one 16-bit tensor."""
    counts = count_params(spec)
    quantization = effective_quantization(spec, w)
    h = spec.hidden_size
    out: list[tuple[object, int, int, str]] = [("embed", counts.embedding, 0, "embed")]
    for i, layer in enumerate(counts.layers):
        linear = sum(fin * fout * n for _, fin, fout, n in layer.linear_shapes)
        for j, (name, fin, fout, n, scheme) in enumerate(_layer_linears(spec, quantization, i, layer)):
            if scheme is None and n > 1 and name.startswith("experts."):
                out.append(((i, j), fin * fout * n, 0, name))
            else:
                out += [((i, j, e), fin * fout, fout if scheme is not None else 0, name) for e in range(n)]
        if layer.bias:
            out.append(((i, "bias"), layer.bias, 0, "bias"))
        norms = max(1, layer.norm // h) if layer.norm else 0
        out += [((i, "norm", j), layer.norm // norms, 0, "norm") for j in range(norms)]
        rest = layer.total - linear - layer.bias - layer.norm
        if rest > 0:
            out.append(((i, "rest"), rest, 0, "rest"))
    if counts.final_norm:
        out.append(("final_norm", counts.final_norm, 0, "final_norm"))
    if counts.lm_head:
        out.append(("lm_head", counts.lm_head, 0, "lm_head"))
    return out


def _bnb_quantizes(spec: ModelSpec, w: Workload) -> bool:
    """Whether ``w`` builds a 16-bit model whose linears bitsandbytes quantizes to 4 bits as it is built."""
    return w.base_quant is WeightsQuant.NF4 and w.precision.param_bytes == 2 and spec.quantization is None


def _bnb_build(st: _Stream, spec: ModelSpec, w: Workload) -> bool:
    """The 4-bit model (bitsandbytes NF4 quantized on load), when that is how ``w`` is built: True if the events
    were emitted. ``w.load`` "config" is the harness (``measure.py`` ``to_4bit``, ``vramplan measure``), below;
    the other loads are :func:`_bnb_from_pretrained`.

    ``from_config`` builds every weight in 16 bits on the device (a tied head also makes and drops its own
    weight); then each decoder ``nn.Linear`` becomes a bitsandbytes ``Linear4bit`` in module order:
    ``Params4bit(...).to("cuda")`` quantizes (``quantize_4bit``: packed weight, absmax and the double-quantization
    constants) before the 16-bit weight dies with the replaced module; ``empty_cache()`` then returns the segments
    left wholly free. For QLoRA, peft's ``prepare_model_for_kbit_training`` (peft/utils/other.py) casts every
    other 16-bit parameter to fp32 (``param.data = param.data.to(torch.float32)``), one at a time."""
    if not _bnb_quantizes(spec, w):
        return False
    if w.load != "config":
        _bnb_from_pretrained(st, spec, w)
        return True
    dense = 2
    others: list[tuple[int, int]] = []  # (key, bytes) of the 16-bit tensors that stay, in parameter order
    linears: list[tuple[int, int, int]] = []  # (key, numel, out_features)
    for tag, numel, fout, _ in _bnb_tensors(spec, w):
        k = st.key(("build", tag))
        st.alloc(k, numel * dense)
        if fout:
            linears.append((k, numel, fout))
        else:
            others.append((k, numel * dense))
    if spec.tie_word_embeddings and not count_params(spec).lm_head:
        st.alloc(st.key("untied_head"), spec.vocab_size * (spec.embed_proj_dim or spec.hidden_size) * dense)
        st.free(st.key("untied_head"))
    for k, numel, fout in linears:
        wb, cb = quantized_linear_bytes(numel, fout, w.base_quant, w.uses_double_quant)
        st.alloc(st.key(("q", k)), wb)
        st.alloc(st.key(("qc", k)), cb)
        st.free(k)
    st.ev.append((None, A.EMPTY))
    _kbit_prepare(st, w, others)
    return True


def _kbit_prepare(st: _Stream, w: Workload, others: list[tuple[int, int]]) -> None:
    """peft's ``prepare_model_for_kbit_training`` for QLoRA: each 16-bit tensor that stayed unquantized (``others``:
    key and bytes, in parameter order) cast to fp32 one at a time (``param.data = param.data.to(torch.float32)``)."""
    if w.method is Method.QLORA and w.is_train:
        for k, n in others:
            st.alloc(st.key(("fp32", k)), 2 * n)
            st.free(k)


def load_note(spec: ModelSpec, w: Workload) -> str:
    """The assumption line for ``w.load`` (what is allocated in the end is the same whatever the load; what the
    caching allocator has reserved, and how it is split, differs)."""
    nf4 = _bnb_quantizes(spec, w)
    if w.load == "config":
        return ("weights built by from_config on the device, one tensor at a time (the calibration harness)"
                + ("; a tied head's own weight made and dropped" if untied_head_bytes(spec, w) else "")
                + ("; the linears then quantized to 4 bits and the cache emptied" if nf4 else ""))
    if nf4:
        return ("weights from_pretrained with bitsandbytes 4-bit: its quantizer sets device_map to the current GPU "
                "when none is given; the caching-allocator warm-up block (the checkpoint's bytes, 4-bit linears "
                "at half a byte an element), then each tensor in checkpoint-key order, every linear loaded in "
                "16 bits and quantized on the GPU (transformers core_model_loading, integrations/bitsandbytes.py)")
    if w.load == "device-map":
        return ("weights from_pretrained(..., device_map=...): transformers' caching_allocator_warmup allocates and "
                "frees one block of the checkpoint's bytes (a tied head once), then each tensor is copied in "
                "checkpoint-key order (modeling_utils.py, core_model_loading.py; experts merged on load not "
                "modelled: their per-expert copies are transients of the load, whose cached blocks later requests "
                "reuse)")
    return ("weights from_pretrained on the CPU, then model.to('cuda') (the HF Trainer's _move_model_to_device): "
            "one tensor per parameter in module order, a tied head once"
            + ("; peft's adapters moved with their layers" if w.uses_adapters and w.is_train else ""))


def _warmup(st: _Stream, nbytes: int) -> None:
    """transformers ``caching_allocator_warmup`` (modeling_utils.py): ``torch.empty(byte_count // 2,
    dtype=float16)`` on the device, dropped when the function returns; its block stays cached for the tensors that
    follow. (The cap at the device's free memory less 1.2 GiB is not modelled: a model that large does not fit.)"""
    if nbytes >= 2:
        st.alloc(st.key("warmup"), nbytes // 2 * 2)
        st.free(st.key("warmup"))


def _bnb_from_pretrained(st: _Stream, spec: ModelSpec, w: Workload) -> None:
    """``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` of a 16-bit checkpoint
    (transformers 5.25): the warm-up block sized by ``get_total_byte_count`` (quantized linears at the quantizer's
    ``quantized_element_size``, 0.5 byte; every other tensor at its size; a tied head once), then, loading
    synchronously (on-the-fly quantization turns the thread pool off: ``convert_and_load_state_dict_in_model``),
    each checkpoint tensor in ``dot_natural_key`` order: a linear's weight arrives in 16 bits on the GPU and
    ``Bnb4bitQuantize`` makes ``Params4bit(...).to(device)`` of it (packed weight and constants) before the 16-bit
    copy dies. No ``empty_cache``. QLoRA then runs peft's fp32 casts (:func:`_kbit_prepare`)."""
    dense = 2
    tensors = _bnb_tensors(spec, w)
    _warmup(st, sum(numel // 2 if fout else numel * dense for _, numel, fout, _ in tensors))
    # checkpoint keys: "lm_head" before "model.embed_tokens" before "model.layers.N" (N by value) before
    # "model.norm"; within a layer "mlp.*" before "self_attn.*"
    rank = {"lm_head": -2, "embed": -1, "final_norm": spec.num_layers}
    layers: dict[int, list[tuple[object, int, int, str]]] = {}
    for t in tensors:
        tag = t[0]
        layers.setdefault(int(tag[0]) if isinstance(tag, tuple) else rank[str(tag)], []).append(t)
    mlp = {name for moe in (False, spec.is_moe) for name, *_ in mlp_linears(spec, moe)}
    for group in sorted(layers):
        for tag, numel, fout, _ in sorted(layers[group], key=lambda t: (t[3] not in mlp, t[3])):
            k = st.key(("build", tag))
            st.alloc(k, numel * dense)
            if not fout:
                continue
            wb, cb = quantized_linear_bytes(numel, fout, w.base_quant, w.uses_double_quant)
            st.alloc(st.key(("q", k)), wb)
            st.alloc(st.key(("qc", k)), cb)
            st.free(k)
    # peft casts in parameter (construction) order
    _kbit_prepare(st, w, [(st.key(("build", tag)), numel * dense) for tag, numel, fout, _ in tensors if not fout])


def _build_weights(st: _Stream, spec: ModelSpec, w: Workload, params: list[tuple[str, int]],
                   adapters: list[int]) -> None:
    """The weights (``params``: :func:`_param_tensors`) and peft's adapters (``adapters``, flat, layer by layer) on
    the device as ``w.load`` puts them there, under the keys the step's events refer to (``("param", j)``,
    ``("adapter", j)``)."""
    if _bnb_build(st, spec, w):
        pass
    elif w.load == "config":
        for j, (_, n) in enumerate(params):
            st.alloc(st.key(("param", j)), n)
        _untied_head(st, spec, w)
    elif w.load == "device-map":
        _warmup(st, sum(n for _, n in params))
        order = list(range(len(params)))
        if count_params(spec).lm_head:  # "lm_head.weight" sorts before "model.*"
            order = [order[-1], *order[:-1]]
        for j in order:
            st.alloc(st.key(("param", j)), params[j][1])
    else:  # to-device: Module._apply in module order; a get_peft_model'ed model moves its adapters with their layers
        by_layer = _adapters_by_layer(spec, w) if adapters else []
        a = 0
        for j, (group, n) in enumerate(params):
            st.alloc(st.key(("param", j)), n)
            nxt = params[j + 1][0] if j + 1 < len(params) else None
            if group.startswith("layer") and nxt != group and by_layer:
                for m in by_layer[int(group[5:])]:
                    st.alloc(st.key(("adapter", a)), m)
                    a += 1
        for j in range(a, len(adapters)):
            st.alloc(st.key(("adapter", j)), adapters[j])
        return
    for j, n in enumerate(adapters):
        st.alloc(st.key(("adapter", j)), n)


def untied_head_bytes(spec: ModelSpec, w: Workload) -> int:
    """The output projection's own weight that a tied-embedding model creates and drops while it is built.

    ``from_config`` under ``torch.device("cuda")`` runs ``XForCausalLM.__init__``, whose
    ``nn.Linear(hidden, vocab)`` allocates the head's weight on the device; ``post_init`` then ties it
    (transformers ``modeling_utils.PreTrainedModel.tie_weights``: ``setattr(lm_head, "weight", embed.weight)``) and
    the untied tensor dies. Its block stays cached, a segment of its own that later requests split
    (the calibration harness calls no ``empty_cache`` between building and training). Quantizing the linear
    layers after the build (bitsandbytes ``Linear4bit``, as the harness and ``--weights-quant nf4`` do) ends
    with ``empty_cache``, which returns the free segment: 0 then."""
    if not spec.tie_word_embeddings or w.base_quant is not WeightsQuant.NONE:
        return 0
    return spec.vocab_size * (spec.embed_proj_dim or spec.hidden_size) * w.precision.param_bytes


def _untied_head(st: _Stream, spec: ModelSpec, w: Workload) -> None:
    n = untied_head_bytes(spec, w)
    if n:
        st.alloc(st.key("untied_head"), n)
        st.free(st.key("untied_head"))


def _adapters(spec: ModelSpec, w: Workload) -> list[int]:
    return [n for layer in _adapters_by_layer(spec, w) for n in layer]


def _adapters_by_layer(spec: ModelSpec, w: Workload, stepped: bool = False) -> list[list[int]]:
    """The bytes of every LoRA adapter tensor (A, then B, per target), layer by layer; ``stepped``: only those that
    get a gradient (not on the linears that run under no_grad, params.no_grad_linears)."""
    if not (w.uses_adapters and w.is_train):
        return []
    targets = lora_targets(spec, w.lora_targets)
    r = w.lora_rank
    out = []
    for i in range(spec.num_layers):
        layer: list[int] = []
        skip = no_grad_linears(spec, i) if stepped else frozenset()
        for name, fin, fout, n in attention_linears(spec) + mlp_linears(spec, i in spec.moe_layers):
            if name in targets and name not in skip:
                layer += [r * fin * 4, fout * r * 4] * n  # peft keeps adapters in fp32
        out.append(layer)
    return out


def _base_trains(w: Workload, group: str, first_trainable: int) -> bool:
    """Whether the base parameter tensors of ``group`` (:func:`_param_tensors`: ``embed``, ``head``, ``layer{i}``)
    train: every one under full fine-tuning; the head and the layers from ``first_trainable`` on under freeze;
    none under adapters (their own tensors train)."""
    if w.method is Method.FULL:
        return True
    if w.method is not Method.FREEZE:
        return False
    return group == "head" or (group.startswith("layer") and int(group[5:]) >= first_trainable)


def _trainable(w: Workload, params: list[tuple[str, int]], adapters: list[int], first_trainable: int) -> list[int]:
    if w.uses_adapters:
        return adapters
    return [n for g, n in params if _base_trains(w, g, first_trainable)]


def _stepped(spec: ModelSpec, w: Workload, params: list[tuple[str, int]], first_trainable: int) -> list[int]:
    """The trainable tensors the optimizer's step updates: those with a gradient. The layers the forward skips
    (``spec.idle_layers``) and the modules that run under no_grad (DSA's indexers) make none, and torch's optimizers
    pass over a parameter whose ``grad`` is None (torch/optim/adam.py ``_init_group``, which AdamW inherits: only
    ``if p.grad is not None`` is a state created or a tensor stepped), so the first step creates no state for them
    and the step's temporaries skip them."""
    if w.uses_adapters:
        return [n for i, layer in enumerate(_adapters_by_layer(spec, w, stepped=True)) if i not in spec.idle_layers
                for n in layer]
    idle = {f"layer{i}" for i in spec.idle_layers}
    # a layer's tensors of the linears that run under no_grad (params.no_grad_linears: DSA's indexers), by size
    elem = w.precision.param_bytes
    skip = {f"layer{i}": [fin * fout * elem for name, fin, fout, n in attention_linears(spec.layer(i))
                          if name in no_grad_linears(spec, i) for _ in range(n)]
            for i in range(spec.num_layers) if spec.index_heads and i not in spec.idle_layers}
    out = []
    for g, n in params:
        if _base_trains(w, g, first_trainable) and g not in idle:
            if n in skip.get(g, ()):
                skip[g].remove(n)
            else:
                out.append(n)
    if spec.idle_params and w.method is Method.FULL and params and params[0][0] == "embed":
        # the idle parameters outside the layers' modules (Mllama's cross-attention norms and gates, DeepSeek-V4's
        # indexers) are counted in the embedding's tensor (params.count_params: extra_params)
        out[0] = max(0, out[0] - spec.idle_params * w.precision.param_bytes)
    return out


def _optimizer(opt: Optimizer, sizes: list[int], states: ModelStates) -> tuple[list[int], list[int]]:
    """(state tensors created in the first step, temporaries of every step), per parameter in order.

    AdamW, SGD, 8-bit AdamW, Adafactor and Lion as their step creates them; every other optimizer (paged,
    GaLore, APOLLO, Muon) as :mod:`vramplan.memory` sizes it: its on-device state spread over the trainable
    tensors in proportion to their size, its step temporaries as one block."""
    st, tmp = _optimizer_tensors(opt, sizes)
    if not st and not tmp and (states.optimizer_state or states.step_temporaries):
        total = sum(sizes) or 1
        st = [n * states.optimizer_state // total for n in sizes if n * states.optimizer_state // total]
        tmp = [states.step_temporaries] if states.step_temporaries else []
    return st, tmp


def _optimizer_tensors(opt: Optimizer, sizes: list[int]) -> tuple[list[int], list[int]]:
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


def _layer_order(spec: ModelSpec, first_trainable: int, every: int = 0,
                 no_grad_input: int = -1) -> list[tuple[int, int]]:
    """The decoder layers the forward runs, bottom to top, each as (layer index, index of its group in
    ``estimator._layer_groups``): the groups list identical layers by first occurrence; the stream runs them in the
    model's order. Layers the forward skips (``spec.idle_layers``: MllamaTextModel.forward ``continue``s past a
    cross-attention layer when ``cross_attention_states`` is None and the cache holds none for it, modeling_mllama.py)
    are left out here as ``_layer_groups`` leaves them out: they allocate nothing."""
    from .estimator import _layer_key

    index: dict[object, int] = {}
    return [(i, index.setdefault(_layer_key(spec, i, first_trainable, every, no_grad_input), len(index)))
            for i in range(spec.num_layers) if i not in spec.idle_layers]


def _autocast_cached(tpl: _Template, codes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """A checkpointed layer's forward under ``torch.autocast`` without the frees of its weights' 16-bit copies,
    and the codes of those copies.

    Autocast caches the cast of a leaf tensor that requires grad (``cached_cast`` in
    aten/src/ATen/autocast_mode.cpp: ``arg.requires_grad() && arg.is_leaf()``), and the cache is cleared only
    when the outermost autocast context exits (``torch.autocast.__exit__`` calls ``clear_autocast_cache`` once the
    nesting level is 0). A layer under non-reentrant ``torch.utils.checkpoint`` saves nothing, so without the
    cache its weight copies would die after each matmul; with it they all stay until the model call returns
    and the ``with torch.autocast`` block ends. (A saving forward keeps them as saved tensors anyway, and the
    recomputation in backward runs in an autocast context of its own that exits after each layer.)"""
    weights = MemoryKind.WEIGHTS
    casts = {tpl.local[id(t)] for t in tpl.tp.tensors
             if _KIND_OF[t.kind] is weights and not t.external and not t.rg and id(t) in tpl.local}
    held = [code for code, n in codes if n > 0 and code in casts]
    keep = set(held)
    return [(code, n) for code, n in codes if not (n == _FREE and code in keep)], held


def _live(codes: list[tuple[int, int]]) -> set[int]:
    """Codes a recorded event list leaves allocated."""
    live: set[int] = set()
    for code, n in codes:
        if n > 0:
            live.add(code)
        elif n == _FREE:
            live.discard(code)
    return live


def _seeded(items: list[Event], seeds: list[Event]) -> list[Event]:
    """The head's backward with the gradients the tape takes as given: ``loss.backward()`` allocates the
    loss's (a scalar of ones) at once; every other gradient (the logits' too: ``Tape.inner_grads``) is the
    replay's."""
    return seeds + items


ROOT = -1  # the unit of a rank's hooks that holds the embedding, the final norm and the head


class RankHooks(Protocol):
    """What a multi-GPU engine adds to one rank's training stream (:mod:`vramplan.parallel.streams`): the
    parameters it builds instead of the single-GPU ones, what it allocates and frees around each unit's forward
    and backward (a decoder layer ``k`` or :data:`ROOT`), and the optimizer's tensors for the states it holds.
    ``grad_ready`` sees each parameter gradient as autograd makes it (a gradient hook); ``post_backward`` gets the keys
    of the unit's parameter gradients; ``optimizer_step`` allocates (step 0: creates) the optimizer's tensors and
    frees what the step consumes, adding the keys that live on to ``st.opt_keys``."""

    per_param_grads: bool  # whether grad_ready acts (else the stream skips the per-gradient calls)

    def build(self, st: _Stream) -> None: ...
    def pre_forward(self, st: _Stream, unit: int) -> None: ...
    def post_forward(self, st: _Stream, unit: int) -> None: ...
    def pre_backward(self, st: _Stream, unit: int) -> None: ...
    def grad_ready(self, st: _Stream, key: int, nbytes: int) -> None: ...
    def post_backward(self, st: _Stream, unit: int, grads: list[int], accumulate: bool) -> None: ...
    def optimizer_step(self, st: _Stream, step: int) -> None: ...


# torch/nn/parallel/distributed.py and torch/csrc/distributed/c10d/reducer.cpp (torch 2.13)
DDP_FIRST_BUCKET_BYTES = 1 << 20  # dist._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * MiB  # bucket_cap_mb=25
DDP_BROADCAST_BYTES = 250 * MiB  # _sync_module_states(broadcast_bucket_size=int(250 * 1024 * 1024))


def bucket_assignment(sizes: list[int], limits: list[int]) -> list[list[int]]:
    """``compute_bucket_assignment_by_size`` (reducer.cpp) for tensors of one dtype: each tensor joins the open
    bucket, which closes once its bytes reach the current limit; the next limit applies from then on (the last
    one for every later bucket). Returns the tensors' indices per bucket."""
    out: list[list[int]] = []
    cur: list[int] = []
    size = li = 0
    for i, n in enumerate(sizes):
        cur.append(i)
        size += n
        if size >= limits[li]:
            out.append(cur)
            cur, size = [], 0
            li = min(li + 1, len(limits) - 1)
    if cur:
        out.append(cur)
    return out


def _ddp_construction(st: _Stream, states: list[list[int]], trainable: list[int]) -> None:
    """What ``DistributedDataParallel(model)`` allocates (default settings: no unused-parameter search, no static
    graph, ``gradient_as_bucket_view=False``).

    ``_sync_module_states`` broadcasts every parameter from rank 0 with ``_broadcast_coalesced``: buckets of at
    least 250 MiB per dtype, each flattened into one new tensor (``flatten_dense_tensors``: a ``cat``, or a view
    for a bucket of one tensor), at most two in flight (``broadcast_coalesced`` in reducer.cpp). Then the
    ``Reducer`` gets one bucket holding every trainable parameter's gradient (``compute_bucket_size_limits``
    returns ``[sys.maxsize]`` for the first iteration), allocated as one flat tensor (``initialize_buckets``)."""
    flats: list[int] = []
    for g, sizes in enumerate(states):
        for j, idx in enumerate(bucket_assignment(sizes, [DDP_BROADCAST_BYTES])):
            if len(flats) >= 2:
                st.free(flats.pop(0))
            k = st.key(("ddp_broadcast", g, j))
            if len(idx) > 1:
                st.alloc(k, sum(sizes[i] for i in idx))
            flats.append(k)
    for k in flats:
        st.free(k)
    if sum(trainable):
        st.alloc(st.key(("ddp_bucket", 0)), sum(trainable))


def _ddp_rebuild(st: _Stream, trainable: list[int]) -> None:
    """The second iteration's forward rebuilds the buckets in the order the first backward made the gradients
    ready (``Reducer::rebuild_buckets``: limits 1 MiB for the first bucket, then 25 MiB): the one bucket dies
    (``buckets_.clear()`` in ``initialize_buckets``), then each new bucket is allocated. The gradients come in
    the reverse of the parameters' order."""
    if not sum(trainable):
        return
    st.free(st.key(("ddp_bucket", 0)))
    ready = trainable[::-1]
    for j, idx in enumerate(bucket_assignment(ready, [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES])):
        k = st.key(("ddp_bucket", 1 + j))
        st.opt_keys.add(k)  # kept from step to step, as the optimizer's state
        st.alloc(k, sum(ready[i] for i in idx))


def train_events(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, steps: int = 3,
                 ddp: bool = False, *, reference: bool = False, hooks: RankHooks | None = None) -> list[Event]:
    """The allocation stream of ``steps`` training steps as the calibration loop runs them; the peaks are
    reset at every step's start after the first (``torch.cuda.reset_peak_memory_stats``), so a replay reports
    the last step. ``ddp``: one rank of ``DistributedDataParallel`` (``vramplan measure --gpus N``). ``hooks``:
    one rank of a sharded layout (FSDP, ZeRO): what its engine allocates around the single-GPU programs."""
    return list(train_stream(spec, w, states, num, steps, ddp=ddp, reference=reference, hooks=hooks))


def train_stream(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, steps: int = 3,
                 probe: list[int] | None = None, ddp: bool = False, *, reference: bool = False,
                 hooks: RankHooks | None = None) -> Iterator[Event]:
    """:func:`train_events` step by step (see :func:`_train_steps`)."""
    return itertools.chain.from_iterable(_train_steps(spec, w, states, num, steps, probe, ddp, reference, hooks))


def _train_steps(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, steps: int,
                 probe: list[int] | None, ddp: bool, reference: bool,
                 hooks: RankHooks | None = None) -> Iterator[list[Event]]:
    """The events of :func:`train_events`, one list per step (a replay takes the next list once it has
    replayed the previous one). With ``probe`` (filled by :func:`vramplan.allocator.simulate` with
    what is reserved at each ``PROBE`` marker, one at every step's start and end) the stream stops after the
    first step, from the second on, that reserved nothing new: every step ends with the tensors it began with
    (weights, the optimizer states created in the first step) and free neighbours merge, so such a step leaves
    the allocator exactly as it found it and every later step would repeat it. ``reference``: every block
    instance filtered event by event (:meth:`_Stream.add`) instead of by :meth:`_Stream.add_instance` (the same
    stream; the tests compare the two)."""
    from .estimator import (
        _first_trainable,
        _layer_groups,
        _no_grad_input,
        _plan,
        _trainable_parts,
        embed_grads_exist,
        tied_gradient_sum,
    )

    b, s = (1, w.tokens) if w.packing else (w.batch_size, w.seq_len)
    attention = Attention.FLASH if w.packing else w.attention
    every = w.checkpoint_every
    full = w.method is Method.FULL
    acc_runs = w.gradient_accumulation > 1
    st = _Stream()
    params = _param_tensors(spec, w, states)
    adapters = _adapters(spec, w)
    if hooks is not None:
        hooks.build(st)
    else:
        _build_weights(st, spec, w, params, adapters)
    first = _first_trainable(spec, w, states)
    train_sizes = _trainable(w, params, adapters, first)
    if ddp:  # peft's fp32 adapters are a dtype of their own: broadcast in buckets of their own
        _ddp_construction(st, [[n for _, n in params], adapters] if adapters else [[n for _, n in params]],
                          train_sizes)
    st.alloc(st.key("ids"), b * s * 8)

    embed_trainable, norm_trainable, head_trainable, layers_rg = _trainable_parts(spec, w)
    loss_kind = w.resolved_loss

    def record(tpl: _Template, fn: str, flag: bool | frozenset[int]) -> list[tuple[int, int]]:
        """``fn``: "forward" (``flag``: saving) or "backward" (``flag``: which parameter gradients exist)."""
        ev: list[Event] = []
        if fn == "forward":
            layer_forward(tpl.tp, bool(flag), ev)
        else:
            layer_backward(tpl.tp, flag, ev)
        return tpl.compile(ev)

    et = Tape(True)
    ex = build_embed(et, spec, num, b, s, embed_trainable,
                     out_rg=full or embed_trainable or (w.uses_adapters and bool(every)), attention=attention)
    emb = _Template(et, None, ex)
    e_fwd = record(emb, "forward", True)
    # a tied weight: the head's gradient (a transposed view, TBackward0) waits in the AccumulateGrad's InputBuffer
    # and the embedding's is added to it out of place (the estimator's third embedding-sized buffer); without a
    # .grad yet, AccumulateGrad takes that sum as the gradient and the head's buffer dies (freed below). Under
    # autocast the head's gradient is the weight cast's (ToCopyBackward0, a tensor of its own): added in place
    tied_sum = tied_gradient_sum(spec, num, embed_trainable, head_trainable)
    if tied_sum:
        et.meets_view_grad.add(hash("embed"))
    e_bwd_acc = record(emb, "backward", True) if acc_runs else []
    if tied_sum and hooks is None:
        et.sum_is_grad.add(hash("embed"))
    e_bwd = record(emb, "backward", embed_grads_exist(False, spec.tie_word_embeddings and head_trainable))
    if not acc_runs:
        e_bwd_acc = e_bwd
    e_extra = [emb.local[id(t)] for t in et.tensors if t.keep and t is not ex and t.nbytes and id(t) in emb.local]
    e_scoped: list[int] = []  # the attention masks: they die when the base model's forward returns

    Codes = list[tuple[int, int]]
    groups: list[tuple[int, _Template, bool, Codes, Codes, Codes, Codes, bool]] = []
    autocast_held: dict[int, list[int]] = {}  # group -> codes of the weight casts autocast caches
    fresh_at = _no_grad_input(spec, w, first)
    order = _layer_order(spec, first, every, fresh_at)
    for count, trainable, moe, sliding, rope, ck, kind, fresh in _layer_groups(spec, first, every, fresh_at):
        rg = layers_rg and (trainable or w.method is not Method.FREEZE)
        tp = Tape(True)
        lout = build_layer(tp, spec, num, _plan(spec, w, trainable, rg and not fresh, moe, sliding, rope, attention,
                                                kind), b, s)
        x = tp.tensors[0]
        c = ck and rg
        off = w.activation_offload and rg and not c
        if c:
            x.keep = True
        tpl = _Template(tp, x, lout)
        if off:
            # activation offloading: what the layer saves goes to pinned host memory as autograd packs it
            # and comes back before its backward (the saved set: what a saving forward keeps beyond a plain one)
            saving = record(tpl, "forward", True)
            fwd = record(tpl, "forward", False)
            kept = _live(saving)
            rec = [(code, n) for code, n in saving if n > 0 and code in kept and code not in _live(fwd)]
        else:
            fwd = record(tpl, "forward", not c)
            rec = record(tpl, "forward", True) if c else []
        bwd = record(tpl, "backward", False)
        bacc = record(tpl, "backward", True) if acc_runs else bwd
        if c and num.amp:
            fwd, autocast_held[len(groups)] = _autocast_cached(tpl, fwd)
        groups.append((count, tpl, c, fwd, rec, bwd, bacc, bool(x.saved_by) and not off))
    if not any(g[2] for g in groups):  # (a checkpoint keeps them with the layer's inputs for its recomputation)
        e_scoped = [emb.local[id(t)] for t in et.forward_scoped if t.nbytes and id(t) in emb.local]
        e_extra = [code for code in e_extra if code not in e_scoped]

    ht = Tape(True)
    build_head(ht, spec, num, b, s, trainable=norm_trainable, head_trainable=head_trainable,
               input_rg=layers_rg, logits_tokens=b * s, loss=True, keep_logits=w.trainer is Trainer.PLAIN,
               loss_kind=loss_kind.value, chunk=w.loss_chunk,
               metrics=w.trainer is Trainer.TRL_SFT and loss_kind is Loss.STANDARD)
    # the logits the loop holds get their gradient inside the head, from the loss (the cast back from the fp32 loss
    # path, or LogSoftmaxBackward0 when the logits are fp32): loss.backward() is given the loss's gradient only, so the
    # head's backward allocates and frees its gradients in the engine's order (an fp32 head: NllLossBackward0's, then
    # LogSoftmaxBackward0's, then the first dies; torch/csrc/autograd/engine.cpp evaluate_function)
    ht.inner_grads.update(id(t) for t in ht.tensors if t.keep and t.rg and not t.external and t.nbytes > 512)
    head = _Template(ht, ht.tensors[0], None)
    h_fwd = record(head, "forward", True)
    h_bwd = record(head, "backward", False)
    h_bwd_acc = record(head, "backward", True) if acc_runs else h_bwd
    seeds = [(head.local.setdefault(("g", id(t)), len(head.local)), t.nbytes)
             for t in ht.tensors if t.keep and t.rg and not t.external and id(t) not in ht.inner_grads]
    head_kept = [head.local[id(t)] for t in ht.tensors if t.keep and id(t) in head.local]
    tied_code = head.local.get(("p", hash("embed"))) if et.sum_is_grad else None

    # the first step creates the state of the tensors with a gradient, in their order, and steps only them
    no_grad = spec.idle_layers or spec.idle_params or spec.index_heads
    opt_states, opt_temps = ([], []) if hooks else _optimizer(
        w.optimizer, _stepped(spec, w, params, first) if no_grad else train_sizes, states)
    fresh = hooks is not None  # a sharded engine takes every micro-batch's gradients away after its backward
    L = len(order)  # the layers the forward runs; y(k) is the output of the k-th of them
    first_saves_x = groups[order[0][1]][7] if groups else True
    first_ckpt = groups[order[0][1]][2] if groups else False
    micro = min(w.gradient_accumulation, 2)
    st.alloc(st.key(("cublas", 0)), CUBLAS_WORKSPACE)
    st.alloc(st.key(("cublas", 1)), CUBLAS_WORKSPACE)
    grads: list[int] = []
    makes_grads: dict[int, bool] = {}  # id(codes) -> whether the event list allocates a parameter gradient

    def run(tpl: _Template, codes: list[tuple[int, int]], base: int, xk: int, yk: int, gxk: int,
            gyk: int, fast: bool = True) -> list[Event]:
        """One instance of a recorded block: its events added to the stream (``fast``), or returned to be edited."""
        if tpl.pgrads:
            grads.extend(base + c for c in tpl.pgrads)
            if hooks is not None and hooks.per_param_grads and fast and _makes_grads(tpl, codes, makes_grads):
                hooked(tpl.instance(codes, base, xk, yk, gxk, gyk), {base + c for c in tpl.pgrads})
                return []
        if fast and not reference:
            st.add_instance(codes, base, xk, yk, gxk, gyk)
            return []
        items = tpl.instance(codes, base, xk, yk, gxk, gyk)
        if fast:
            st.add(items)
        return items

    def hooked(items: list[Event], pgrads: set[int]) -> None:
        """Add a backward's events, handing every parameter gradient to the engine's hook as it is made."""
        assert hooks is not None
        for key, n in items:
            fresh_grad = n > 0 and key in pgrads and key not in st.live
            st.add([(key, n)])
            if fresh_grad:
                hooks.grad_ready(st, key, n)  # type: ignore[arg-type]

    def begin(step: int) -> None:
        if step:
            st.ev.append((None, A.RESET))
        st.ev.append((None, A.PROBE))
        if ddp and step == 1:
            _ddp_rebuild(st, train_sizes)

    def micro_batch(step: int, mb: int, grads_exist: bool) -> list[int]:
        """One micro-batch's forward and backward; the keys of the parameter gradients it made."""
        grads.clear()
        acc = grads_exist and not fresh
        t = (step, mb)

        def y(k: object) -> int:
            return st.key(("y", t, k))

        def gy(k: object) -> int:
            return st.key(("gy", t, k))

        st.mark(Phase.FORWARD)
        if hooks:
            hooks.pre_forward(st, ROOT)
        e_base = st.fresh(len(emb.local))
        run(emb, e_fwd, e_base, -9, y(-1), -9, gy(-1))
        bases: list[int] = []
        cached: list[int] = []
        for k, (i, gi) in enumerate(order):
            _count, tpl, c, fwd, _rec, _bwd, _bacc, _saves = groups[gi]
            base = st.fresh(len(tpl.local))
            bases.append(base)
            cached += [base + code for code in autocast_held.get(gi, ())]
            if hooks:
                hooks.pre_forward(st, i)
            if k == 0 and not first_saves_x and not c:
                # transformers' base model keeps inputs_embeds referenced until it returns
                items = run(tpl, fwd, base, y(k - 1), y(k), gy(k - 1), gy(k), fast=False)
                st.add([(kk, n) for kk, n in items if not (n == _FREE and kk == y(-1))])
            else:
                run(tpl, fwd, base, y(k - 1), y(k), gy(k - 1), gy(k))
            if hooks:
                hooks.post_forward(st, i)
        if not first_saves_x and not first_ckpt:
            st.free(y(-1))
        for code in e_scoped:  # the base model's forward returned: its attention masks die
            st.free(e_base + code)
        h_base = st.fresh(len(head.local))
        run(head, h_fwd, h_base, y(L - 1), -9, gy(L - 1), -9)
        for kk in cached:  # leaving torch.autocast clears its cache of weight casts
            st.free(kk)
        if hooks:
            hooks.post_forward(st, ROOT)
        st.mark(Phase.BACKWARD)
        if hooks:
            hooks.pre_backward(st, ROOT)
        h_items = _seeded(run(head, h_bwd_acc if acc else h_bwd, h_base, y(L - 1), -9, gy(L - 1), -9, fast=False),
                          [(h_base + code, n) for code, n in seeds])
        if hooks and hooks.per_param_grads:
            hooked(h_items, {h_base + code for code in head.pgrads})
        else:
            st.add(h_items)
        for k in range(L - 1, -1, -1):
            i, gi = order[k]
            _count, tpl, c, _fwd, rec, bwd, bacc, _saves = groups[gi]
            base = bases[k]
            if hooks:
                hooks.pre_backward(st, i)
            if c:  # recompute the layer's forward (saving), then its backward; then drop its input
                base = st.fresh(len(tpl.local))
                run(tpl, rec, base, y(k - 1), y(("r", k)), gy(k - 1), gy(k))
                st.free(y(("r", k)))
            elif rec:  # offloaded: the saved tensors come back from the host
                run(tpl, rec, base, y(k - 1), y(k), gy(k - 1), gy(k))
            run(tpl, bacc if acc else bwd, base, y(k - 1), y(k), gy(k - 1), gy(k))
            if hooks:
                hooks.post_backward(st, i, [base + code for code in tpl.pgrads], mb > 0)
            if c:
                st.free(y(k - 1))
        run(emb, e_bwd_acc if acc else e_bwd, e_base, -9, y(-1), -9, gy(-1))
        if tied_code is not None and not acc:  # the tied weight's gradient is now the sum (Tape.sum_is_grad)
            st.free(h_base + tied_code)
        if hooks:
            hooks.post_backward(st, ROOT, [h_base + code for code in head.pgrads] +
                                [e_base + code for code in emb.pgrads], mb > 0)
        for code in e_extra:
            st.free(e_base + code)
        st.free(y(-1))
        if micro > 1 and not acc:  # the next micro-batch's output replaces this one's
            for code in head_kept:
                st.free(h_base + code)
        return grads.copy()

    def optimizer_step(step: int) -> None:
        st.mark(Phase.OPTIMIZER_STEP)
        if hooks:
            hooks.optimizer_step(st, step)
        _optimizer_step(st, opt_states, opt_temps, step)

    # zero_grad(set_to_none=True), then ``del out`` drops the logits and the loss, and with them what is left of
    # the step (the optimizer's states and DDP's rebuilt buckets, ``opt_keys``, stay)
    for step in training_steps(st, steps, micro, begin=begin, micro_batch=micro_batch,
                               optimizer_step=optimizer_step, persistent=st.opt_keys):
        st.ev.append((None, A.PROBE))
        chunk, st.ev = st.ev, []
        yield chunk
        # (with DDP the second step rebuilds the buckets: from the third on the steps repeat)
        if probe is not None and step > int(ddp) and len(probe) >= 2 and probe[-1] == probe[-2]:
            return


def _makes_grads(tpl: _Template, codes: list[tuple[int, int]], memo: dict[int, bool]) -> bool:
    """Whether ``codes`` (an event list of ``tpl``) allocates one of its parameter gradients: scanned once per list
    (``memo``, keyed by the list's id: the lists live as long as the stream that runs them)."""
    made = memo.get(id(codes))
    if made is None:
        made = memo[id(codes)] = any(n > 0 and c in tpl.pgrads for c, n in codes)
    return made


def _optimizer_step(st: _Stream, states: list[int], temps: list[int], step: int) -> None:
    """An optimizer's step: its states (``opt_keys``, kept from then on) created in the first step, then its
    temporaries allocated together and freed."""
    if step == 0:
        for j, n in enumerate(states):
            k = st.key(("opt", j))
            st.opt_keys.add(k)
            st.alloc(k, n)
    # ``st.alloc`` of each temporary, then ``st.free`` of each: the keys are fresh, so every one allocates and those
    # of a positive size are live until their free (which leaves ``live`` as it was)
    tmp = st.fresh(len(temps))
    st.ev.extend(zip(range(tmp, tmp + len(temps)), temps, strict=True))
    st.ev.extend([(tmp + j, _FREE) for j, n in enumerate(temps) if n > 0])


def _growing(spec: ModelSpec, num: Numerics, b: int, s: int, layer: int, kept: list[tuple[int, int]]) -> list[int]:
    """Which of a layer's kept cache tensors decode grows by ``torch.cat``: an attention layer's keys and values
    (the tensors of one prompt-length K or V). A state-space layer's conv and recurrent states have a fixed size
    and are updated in place (cache_utils.py ``LinearAttentionLayer``: ``copy_``), so they never grow."""
    from .estimator import _kv_bytes

    if spec.mixer(layer) not in ATTENTION_MIXERS or spec.layer(layer).kv_shared:
        return []
    per = _kv_bytes(spec.layer(layer), num, b, s, layer in spec.sliding_layers) // 2
    grow = [key for key, n in kept if n == per]
    return grow if grow else [key for key, _ in kept]


def infer_events(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, *,
                 reference: bool = False) -> list[Event]:
    """The allocation stream of one generate-like request as the calibration harness runs it: the peaks are
    reset after the weights are loaded (``reference``: as :func:`train_stream`)."""
    from .estimator import _kv_bytes, _layer_groups, _plan, kv_shared_sliced

    b, s = w.batch_size, w.seq_len
    st = _Stream()
    _build_weights(st, spec, w, _param_tensors(spec, w, states), [])
    st.alloc(st.key("ids"), b * s * 8)
    st.ev.append((None, A.RESET))
    st.mark(Phase.PREFILL)
    et = Tape(False)
    ex = build_embed(et, spec, num, b, s, False, out_rg=False, attention=w.attention)
    emb = _Template(et, None, ex)
    ev: list[Event] = []
    layer_forward(et, ev=ev)
    e_base = st.fresh(len(ev))

    def y(k: object) -> int:
        return st.key(("y", k))

    st.add(emb.instance(emb.compile(ev), e_base, -9, y(-1), -9, -9))
    st.alloc(st.key(("cublas", 0)), CUBLAS_WORKSPACE)
    kv_keys: list[tuple[int, list[int]]] = []  # per layer run: (its index, its cache tensors that decode grows)
    compiled = []
    sliced = False
    for _count, _tr, moe, sliding, rope, _ck, kind, _fresh in _layer_groups(spec, spec.num_layers):
        tp = Tape(False)
        q = 1 if kv_shared_sliced(spec, w, kind) else s
        sliced = sliced or q != s
        out = build_layer(tp, spec, num, _plan(spec, w, False, False, moe, sliding, rope, kind=kind), b, q, kv_len=s)
        tpl = _Template(tp, tp.tensors[0], out)
        ev = []
        layer_forward(tp, ev=ev)
        codes = tpl.compile(ev)
        kept = [(tpl.local[id(t)], t.nbytes) for t in tp.tensors if t.keep and t is not out and id(t) in tpl.local]
        compiled.append((tpl, codes, kept))
    order = _layer_order(spec, spec.num_layers)
    for k, (i, gi) in enumerate(order):
        tpl, codes, kept = compiled[gi]
        base = st.fresh(len(tpl.local))
        if k == 0 or reference:
            items = tpl.instance(codes, base, y(k - 1), y(k), -9, -9)
            st.add([(kk, n) for kk, n in items if not (k == 0 and n == _FREE and kk == y(-1))])
        else:
            st.add_instance(codes, base, y(k - 1), y(k), -9, -9)
        kv_keys.append((i, _growing(spec, num, b, s, i, [(base + c, n) for c, n in kept])))
    st.free(y(-1))
    for t in et.forward_scoped:  # the base model's forward returned: its attention masks die
        if t.nbytes and id(t) in emb.local:
            st.free(e_base + emb.local[id(t)])
    ht = Tape(False)
    last = w.logits is LogitsMode.LAST
    hs = 1 if sliced else s
    build_head(ht, spec, num, b, hs, trainable=False, input_rg=False, logits_tokens=b if last else b * hs,
               loss=False)
    head = _Template(ht, ht.tensors[0], None)
    ev = []
    layer_forward(ht, ev=ev)
    h_base = st.fresh(len(ev))
    st.add(head.instance(head.compile(ev), h_base, y(len(order) - 1), -9, -9, -9))
    for t in et.tensors:
        if t.keep and id(t) in emb.local:
            st.free(e_base + emb.local[id(t)])
    st.free(y(len(order) - 1))
    for t in ht.tensors:  # del out: the logits die, the cache lives on
        if t.keep and id(t) in head.local:
            st.free(h_base + head.local[id(t)])
    if not w.new_tokens:
        return st.ev
    st.mark(Phase.DECODE)
    small = [b * spec.hidden_size * 4, b * spec.intermediate_size * num.act, b * spec.vocab_size * num.act]
    # per layer with a growing cache: its keys, and _kv_bytes(length) // 2 as (bytes per token, window or 0)
    growing = []
    for i, keys in kv_keys:
        if keys:
            one = _kv_bytes(spec.layer(i), num, b, 1, False)
            window = spec.layer(i).sliding_window if i in spec.sliding_layers else 0
            growing.append((keys, one, window or 0))
    ev, live = st.ev, st.live
    for step in range(w.new_tokens):
        length = s + step + 1
        d = st.fresh(3)
        for j, n in enumerate(small[:2]):
            st.alloc(d + j, n)
        if reference:
            for i, keys in kv_keys:
                per = _kv_bytes(spec.layer(i), num, b, length, i in spec.sliding_layers) // 2
                for j, old in enumerate(keys):
                    new = st.fresh(0)
                    st.alloc(new, per)
                    st.free(old)
                    keys[j] = new
            growing = []
        for keys, one, window in growing:
            per = one * (min(length, window) if window else length) // 2
            for j, old in enumerate(keys):  # torch.cat: the longer copy, then the old tensor dies
                new = st.fresh(0)
                if per > 0:  # st.alloc(new, per) of a fresh key, then st.free(old)
                    live[new] = None
                ev.append((new, per))
                if old in live:
                    del live[old]
                    ev.append((old, _FREE))
                keys[j] = new
        st.alloc(d + 2, small[2])
        for j in range(3):
            st.free(d + j)
    return st.ev
