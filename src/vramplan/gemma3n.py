"""Gemma 3n's language model (``gemma3n_text``): AltUp, LAuReL and Gaussian top-k activation sparsity.

transformers 5.24 ``models/gemma3n/modeling_gemma3n.py``. The residual stream is ``altup_num_inputs`` (4) copies of
the hidden states, stacked (A, batch, seq, hidden):

* ``Gemma3nTextModel.forward``: the scaled embeddings ``h0``; each of ``altup_projections`` projects ``h0`` and
  rescales it to ``h0``'s RMS magnitude (``x * target / sqrt(clamp(mean(x^2)))``); ``torch.stack`` of the four is the
  first layer's input (the list holding them is rebound only after the layers). After the layers,
  ``altup_unembed_projections`` project copies 1..A-1 back the same way, ``stack`` and ``mean`` over the copies, then
  the final norm.
* ``Gemma3nTextDecoderLayer``: ``altup.predict`` (router modalities from copy 0: RMSNorm, scale, ``modality_router``,
  ``tanh`` in fp32; ``prediction_coefs``; ``matmul`` of the permuted stream (a copy) with the (A x A) coefficients;
  ``+=`` the input; ``.contiguous()``), the active copy through the sandwich-normed attention (Gemma 4's: q/k norms,
  a scale-free v norm, KV sharing) and MLP, ``laurel`` (``linear_left``/``linear_right`` of rank ``laurel_rank``,
  normed, plus its input), ``(active + attn + laurel) / sqrt(2)``, ``altup.correct`` (``innovation.repeat(A)`` times
  the per-copy coefficients, ``+=`` the predictions), ``correct_output_scale`` on a clone of copy 0, the per-layer
  input branch, and ``corrected[1:] +=`` its output.
* ``Gemma3nTextMLP._gaussian_topk`` (layers whose ``activation_sparsity_pattern`` is > 0): ``relu(x - (mean(x) +
  std(x) * icdf(sparsity)))`` on the gate projection before the activation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B

__all__ = ["altup_expand", "altup_extra_params", "altup_linears", "altup_unembed", "gaussian_topk",
           "gemma3n_layer"]


def altup_linears(a: int, hidden: int, rank: int) -> list[tuple[str, int, int, int]]:
    """A layer's AltUp and LAuReL ``nn.Linear`` modules (no biases)."""
    return [("modality_router", hidden, a, 1), ("prediction_coefs", a, a * a, 1), ("correction_coefs", a, a, 1),
            ("linear_left", hidden, rank, 1), ("linear_right", rank, hidden, 1)]


def altup_extra_params(hidden: int) -> int:
    """A layer's AltUp/LAuReL vectors: ``correct_output_scale``, ``router_norm`` and ``post_laurel_norm``."""
    return 3 * hidden


def _magnitude(bld: _B, x: Tensor) -> Tensor:
    """``torch.mean(x ** 2, dim=-1, keepdim=True)`` (pow saves its input), one value per token."""
    tp = bld.tp
    h = bld.spec.hidden_size
    sq = tp.op(x.numel, x.elem, (x,), save=(x,) if x.rg else (), bwd_scratch=2 * x.numel * x.elem)
    return tp.op(x.numel // h, x.elem, (sq,))


def _rescaled(bld: _B, x: Tensor, target: Tensor) -> Tensor:
    """``x * target_magnitude / sqrt(clamp(mean(x ** 2), 1e-5))``."""
    tp = bld.tp
    m = _magnitude(bld, x)
    m = tp.op(m.numel, m.elem, (m,), save=(m,) if m.rg else ())  # clamp saves its input
    m = bld.ew(m, save_out=True)  # sqrt saves its result
    y = bld.mul(x, target)
    return tp.op(y.numel, y.elem, (y, m), save=(y, m) if (y.rg or m.rg) else ())  # div


def altup_expand(bld: _B, h0: Tensor, trainable: bool) -> Tensor:
    """The model's AltUp expansion of the embeddings ``h0`` into the stacked stream (kept: the layers' input); the
    rescaled projections stay referenced by the list until the layers have run."""
    tp, spec = bld.tp, bld.spec
    h, a = spec.hidden_size, spec.altup_inputs
    target = bld.ew(_magnitude(bld, h0), save_out=True)  # ** 0.5 (pow saves its input and result: one per token)
    parts = [h0]
    proj = h0
    for i in range(1, a):
        proj = bld.linear(h0, h, h, f"altup_projections.{i - 1}", bias=False, trainable=trainable)
        parts.append(_rescaled(bld, proj, target))
    x = tp.op(a * h0.numel, h0.elem, tuple(parts), passthrough=False)  # torch.stack
    tp.keep(*parts[1:], proj)  # (the loop's last ``altup_proj`` stays bound too)
    tp.keep(x)
    return x


def altup_unembed(bld: _B, x: Tensor, trainable: bool) -> Tensor:
    """After the layers: copy 0 and copies 1..A-1 projected back (``altup_unembed_projections``), rescaled to copy
    0's magnitude, stacked and averaged."""
    tp, spec = bld.tp, bld.spec
    h, a = spec.hidden_size, spec.altup_inputs
    n = x.numel // a
    c0 = tp.view(x, n)
    target = bld.ew(_magnitude(bld, c0), save_out=True)
    parts = [c0]
    proj = c0
    for i in range(1, a):
        proj = bld.linear(tp.view(x, n), h, h, f"altup_unembed_projections.{i - 1}", bias=False,
                          trainable=trainable)
        parts.append(_rescaled(bld, proj, target))
    st = tp.op(a * n, x.elem, tuple(parts))  # torch.stack
    tp.hold(*parts, proj)
    return tp.op(n, x.elem, (st,))  # torch.mean(dim=0)


def gaussian_topk(bld: _B, g: Tensor) -> Tensor:
    """``Gemma3nTextMLP._gaussian_topk``: mean and (biased) std over the features, the cutoff ``mean + std *
    multiplier``, ``relu(x - cutoff)`` (relu saves its result; std saves its input and result)."""
    tp = bld.tp
    rows = g.numel // bld.spec.intermediate_size
    mean = tp.op(rows, g.elem, (g,))
    std = tp.op(rows, g.elem, (g,), save=(g,) if g.rg else (), bwd_scratch=2 * g.numel * g.elem)
    if std.rg:
        tp.save_output(std)
    cut = bld.add(mean, tp.op(rows, g.elem, (std,)))
    d = tp.op(g.numel, g.elem, (g, cut))
    return bld.ew(d, save_out=True)


def _router(bld: _B, x: Tensor, tr: bool) -> Tensor:
    """``compute_router_modalities``: router_norm(x) * h ** -1, modality_router, tanh(.float()).type_as(x)."""
    tp, spec = bld.tp, bld.spec
    h, a = spec.hidden_size, spec.altup_inputs
    n = bld.norm(x, h, tr)
    n = tp.op(n.numel, n.elem, (n,))  # * router_input_scale
    r = bld.proj(n, h, a, "modality_router")
    r32 = bld.cast(r, 4)
    th = bld.ew(r32, save_out=True)
    return bld.cast(th, x.elem)


def gemma3n_layer(bld: _B, x: Tensor) -> Tensor:
    """``Gemma3nTextDecoderLayer.forward`` on the stacked stream ``x`` (A x tokens x hidden)."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, a, r = spec.hidden_size, spec.altup_inputs, spec.laurel_rank
    tr = plan.trainable
    n = x.numel // a
    e = x.elem
    # ---- altup.predict
    mods = _router(bld, tp.view(x, n), tr)
    coefs = bld.proj(mods, a, a * a, "prediction_coefs")
    # matmul(x.permute(1, 2, 3, 0), coefs): the permuted stream is copied into bmm's (tokens, hidden, A) operand,
    # which bmm saves for the coefficients' gradient
    xc = tp.op(a * n, e, (x,), passthrough=True)
    pm = tp.op(a * n, e, (xc, coefs), save=(xc, coefs) if (xc.rg or coefs.rg) else (),
               grad_to=tuple(t for t in (xc, coefs) if t.rg))
    pm_add = tp.op(a * n, e, (pm, x), passthrough=True)  # predictions += hidden_states (in place)
    pm_add.nbytes = 0
    pm_add.base = pm
    tp.own_grad.add(id(pm_add))
    pred = tp.op(a * n, e, (pm_add,), passthrough=True)  # .contiguous() of the permuted result
    active = tp.view(pred, n)
    # ---- attention with LAuReL
    n1 = bld.norm(active, h, tr)
    ll = bld.proj(n1, h, r, "linear_left")
    lr = bld.proj(ll, r, h, "linear_right")
    laurel = bld.add(n1, bld.norm(lr, h, tr))
    att = bld.call(bld.self_attention, n1)
    att = bld.norm(att, h, tr)
    gated = bld.add(active, att)
    al = tp.op(n, e, (bld.add(gated, laurel),))  # / math.sqrt(2)
    n2 = bld.norm(al, h, tr)
    m0 = bld.call(bld.mlp, n2)
    m = bld.norm(m0, h, tr)
    act = bld.add(al, m)
    # ---- altup.correct
    mods2 = _router(bld, act, tr)
    innov = bld.add(act, active)  # activated - predictions[active]
    rep = tp.op(a * n, e, (innov,))  # .repeat(A, 1, 1, 1)
    cc = bld.proj(mods2, a, a, "correction_coefs")  # (the clamped weight is A x A)
    cc = tp.op(cc.numel, cc.elem, (cc,))  # + 1.0
    corr = bld.mul(rep, cc)
    corr2 = tp.op(a * n, e, (corr, pred), passthrough=True)  # corrected += predictions (in place)
    corr2.nbytes = 0
    corr2.base = corr
    tp.own_grad.add(id(corr2))
    first = tp.op(n, e, (corr2,))  # corrected[0].clone()
    if spec.altup_correct_scale:
        sc = tp.op(h, bld.num.param, (), rg=tr,
                   params=bld.param_grad(f"correct_output_scale{len(tp.ops)}", h, bld.num.param) if tr else ())
        first = bld.mul(first, sc)
    y = bld.per_layer_tail(first)
    # corrected[1:] += first_prediction: in place on a view; CopySlices' backward clones the stream's gradient
    out = tp.op(a * n, e, (corr2, y), passthrough=True, bwd_scratch=a * n * e)
    out.nbytes = 0
    out.base = corr
    tp.own_grad.add(id(out))
    # the layer's locals live until it returns: predictions, the normed active copy, LAuReL's output, the normed
    # attention output, attn_gated, attn_laurel, attn_norm, the MLP output and its norm, the corrected stream
    tp.hold(pred, n1, laurel, att, gated, al, n2, m0, m, act, corr)
    tp.keep(out)
    return out
