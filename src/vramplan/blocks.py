"""Forward programs of the blocks of a transformers causal LM, recorded on a :class:`~vramplan._engine.tape.Tape`.

Each builder mirrors what the family's ``modeling_*.py`` (transformers 5.x) executes for one
block: which tensors are created, in which dtype, and what autograd saves for backward. The rules
for saving follow PyTorch's ``derivatives.yaml``; the kernel choices follow
``aten/src/ATen/native/transformers/sdp_utils.cpp``; adapters follow peft's ``lora/layer.py``;
4-bit layers follow bitsandbytes' ``Linear4bit`` / ``MatMul4Bit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._engine.numerics import MEM_EFF_MASK_ALIGNMENT, Kernel, Numerics, sdpa_kernel
from ._engine.ops import fused_sdpa, lora_branch, math_sdpa, native_layer_norm, rms_normalize
from ._engine.tape import Tape, Tensor
from .kinds import MemoryKind
from .spec import Activation, MLPKind, ModelSpec, NormKind, PositionKind
from .workload import MODELLED_TRANSFORMERS, Attention, WeightsQuant
from .workload import release as _release

# transformers 5.25 rewrote FalconAttention onto the attention interface (modeling_falcon.py: ALL_ATTENTION_FUNCTIONS,
# the LLaMA-style eager_attention_forward with its fp32 softmax, SDPA through integrations/sdpa_attention.py with the
# causal mask FalconModel always materialises); releases before it run Falcon's own attention code
FALCON_ATTENTION_INTERFACE = (5, 25)

__all__ = ["Kernel", "LayerPlan", "Numerics", "attention_kernel", "build_embed", "build_head", "build_layer",
           "sdpa_kernel", "window_masked"]

# streaming multiprocessors LigerRMSNorm's backward sizes its partial weight gradients by
# (torch.cuda.get_device_properties().multi_processor_count: 132 on H100/H200 SXM; 2 MiB at hidden 4096)
LIGER_SM_COUNT = 132
ACT = MemoryKind.ACTIVATIONS
LOGITS = MemoryKind.LOGITS_LOSS
KV = MemoryKind.KV_CACHE
WEIGHTS = MemoryKind.WEIGHTS


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """Which parameters of one decoder layer train, and how its linears are built."""

    trainable: bool  # base weights require grad (full fine-tuning, or a trainable layer under freeze)
    input_rg: bool  # the layer's input requires grad
    lora_targets: frozenset[str]  # module names carrying LoRA adapters
    lora_rank: int
    quant: WeightsQuant  # storage of the base linears
    attention: Attention
    sliding: bool = False
    moe: bool = False
    lora_dropout: float = 0.0
    dora: bool = False  # peft use_dora: each adapted linear also runs DoraLinearLayer
    rope: bool = True  # False: a NoPE layer (SmolLM3, EXAONE 4 / Command-R7B global layers)
    mixer: str = "attention"  # the token mixer: attention or an SSM kind (vramplan.ssm)
    mlp: bool = True  # False: the layer has no MLP (a pure Mamba block)
    ssm_kernel: str = "fused"  # SSM layers: the fused mamba_ssm kernels or transformers' torch fallback
    input_fp32: bool = False  # the layer's input is the fp32 residual stream (Mamba's residual_in_fp32)
    variant: int = -1  # the layer's group in spec.layer_overrides (heterogeneous stacks: Gemma 4), -1: none
    release: tuple[int, ...] = _release(MODELLED_TRANSFORMERS)  # the transformers release the layer's code is from


def own_falcon_attention(spec: ModelSpec, have: tuple[int, ...]) -> bool:
    """Whether a Falcon layer of transformers release ``have`` runs FalconAttention's own code (before 5.25: the
    fused projection split by copies, SDPA called without ``enable_gqa``, eager scores softmaxed in their dtype)."""
    return spec.family == "falcon" and have < FALCON_ATTENTION_INTERFACE


def mask_always(spec: ModelSpec, have: tuple[int, ...]) -> bool:
    """Whether SDPA always gets a materialised mask in transformers release ``have``: FalconModel builds its causal
    mask with ``allow_is_causal_skip=False``, which reaches SDPA through the attention interface from 5.25 on."""
    return spec.family == "falcon" and not own_falcon_attention(spec, have)


def attention_kernel(spec: ModelSpec, attention: Attention, elem: int, has_mask: bool,
                     have: tuple[int, ...] = _release(MODELLED_TRANSFORMERS)) -> Kernel:
    """The kernel a transformers attention layer runs for inputs of ``elem`` bytes per element.

    BLOOM has no SDPA path in transformers (GPT-J's came in 5.24: ``estimator.runs_as`` picks eager for older
    releases); Falcon calls SDPA itself without ``enable_gqa``; with a mask, transformers' ``use_gqa_in_sdpa()`` is
    False and it repeats k/v to every head first.
    """
    gqa = spec.num_kv_heads != spec.num_heads
    if spec.family == "bloom" or attention is Attention.EAGER or \
            (not spec.sdpa and attention is Attention.SDPA):
        return Kernel.EAGER
    if attention is Attention.FLASH:
        return Kernel.FLASH
    if own_falcon_attention(spec, have):
        return sdpa_kernel(elem, spec.head_dim, has_mask, heads_match=not gqa)
    if sdpa_repeats_kv(spec, has_mask):
        return sdpa_kernel(elem, spec.head_dim, has_mask)
    return sdpa_kernel(elem, spec.head_dim, has_mask, heads_match=not gqa, enable_gqa=gqa)


def window_masked(spec: ModelSpec, kv_len: int) -> bool:
    """Whether transformers hands SDPA a materialised mask for a sliding-window (or chunked) layer: it relies on
    ``is_causal`` only while the key length stays below the window (masking_utils.py ``_ignore_causal_mask_sdpa``:
    ``kv_length >= local_attention_size`` needs the mask, even where the window then covers every key)."""
    return spec.sliding_window is not None and spec.sliding_window > 0 and kv_len >= spec.sliding_window


def sdpa_repeats_kv(spec: ModelSpec, has_mask: bool) -> bool:
    """transformers' SDPA path passes ``enable_gqa`` only without a mask and with head_dim <= 256
    (integrations/sdpa_attention.py ``use_gqa_in_sdpa``, 5.24); otherwise it repeats k/v to every query head first."""
    return has_mask or spec.head_dim > 256


class _B:
    """Builder state for one program: the tape, shapes and numerics."""

    def __init__(self, tp: Tape, spec: ModelSpec, num: Numerics, batch: int, seq: int, plan: LayerPlan | None,
                 kv_len: int | None = None) -> None:
        self.tp = tp
        self.spec = spec
        self.num = num
        self.b = batch
        self.s = seq
        self.t = batch * seq
        self.kv_len = kv_len if kv_len is not None else seq
        self.plan = plan
        self.probs: Tensor | None = None  # the last eager attention's weights
        self._wrapped: list[Tensor] = []  # peft-parametrized expert stacks of the running MoE block

    # ---- primitives ----------------------------------------------------------------------
    def cast(self, x: Tensor, elem: int) -> Tensor:
        return self.tp.cast(x, elem)

    def ew(self, x: Tensor, *, save_in: bool = False, save_out: bool = False, elem: int | None = None) -> Tensor:
        """A unary elementwise op (:meth:`Tape.unary`)."""
        return self.tp.unary(x, save_in=save_in, save_out=save_out, elem=elem)

    def mul(self, a: Tensor, b: Tensor, elem: int | None = None) -> Tensor:
        return self.tp.mul(a, b, elem)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        big = a if a.numel >= b.numel else b
        out = self.tp.op(big.numel, max(a.elem, b.elem), (a, b))
        self.tp.ops[-1].add_like = True
        return out

    def dropout(self, x: Tensor, p: float) -> Tensor:
        """Training-mode dropout: a new output plus a saved bool mask; p == 0 returns the input."""
        if not self.num.training or p <= 0.0:
            return x
        mask = self.tp.op(x.numel, 1, (), rg=False)
        out = self.tp.op(x.numel, x.elem, (x, mask), save=(mask,) if x.rg else (), grad_to=(x,))
        return out

    def param_grad(self, name: str, numel: int, elem: int) -> tuple[tuple[int, int], ...]:
        return ((hash(name), numel * elem),)

    # ---- linear layers ---------------------------------------------------------------------
    def linear(self, x: Tensor, fin: int, fout: int, name: str, *, bias: bool, trainable: bool,
               quant: WeightsQuant = WeightsQuant.NONE, lora_rank: int = 0, out_kind: MemoryKind = ACT,
               weight_elem: int | None = None, count: int = 1) -> Tensor:
        """``nn.Linear`` (or a quantized replacement) on ``x``, with an optional LoRA adapter."""
        tp, num, tokens = self.tp, self.num, x.numel // fin
        welem = weight_elem or num.param
        # ``count`` experts share one 3-D parameter (grouped_mm): its gradient holds all of them
        pg = self.param_grad(name, (fin * fout + (fout if bias else 0)) * count, welem) if trainable else ()
        if quant is not WeightsQuant.NONE:
            # Quantized layers cast the input to the 16-bit compute dtype and cast the output back.
            # nf4 (bitsandbytes MatMul4Bit): dequantizes the weight into a 16-bit temporary for the matmul
            #   (again in backward, for the input gradient); the input is not saved (frozen weight).
            # int8 (LLM.int8, Int8Params): quantizes the activation row-wise to int8 and multiplies with
            #   torch._int_mm into an int32 accumulator; backward dequantizes the weight.
            # fp8: quantizes the activation to fp8 and runs a scaled fp8 GEMM into the 16-bit output.
            xc = self.cast(x, 2)
            if quant.dequantizes:  # bitsandbytes 4-bit, GPTQ/AWQ/… fallback kernels: a 16-bit weight copy
                fwd = fin * fout * 2
            elif quant is WeightsQuant.INT8:
                fwd = tokens * fin + tokens * fout * 4
            else:
                fwd = tokens * fin
            y = tp.op(tokens * fout, 2, (xc,), kind=out_kind, fwd_scratch=fwd,
                      bwd_scratch=fin * fout * 2 if xc.rg else 0)
            y = self.cast(y, x.elem)
        elif num.amp:
            xc = self.cast(x, 2)  # autocast casts the activation at every call
            if num.training:
                # the weight's 16-bit copy: cached for the forward when it is a trainable leaf, and
                # saved for backward (to compute the input gradient) either way
                wc = tp.op(fin * fout * count, 2, (), rg=False, kind=WEIGHTS)
                save = ((xc,) if trainable else ()) + ((wc,) if xc.rg else ())
                y = tp.op(tokens * fout, 2, (xc, wc), save=save, params=pg, kind=out_kind,
                          rg=xc.rg or trainable, grad_to=(xc,))
            else:
                # inference: the 16-bit weight copy lives only for its matmul (measured on an H200: no
                # cache builds up under inference_mode)
                y = tp.op(tokens * fout, 2, (xc,), kind=out_kind, fwd_scratch=fin * fout * 2 * count)
        else:
            y = tp.op(tokens * fout, num.act if x.elem == num.act else x.elem, (x,),
                      save=(x,) if trainable else (), params=pg, kind=out_kind)
        if x.rg:
            tp.ops[-1].packs_weight = True  # mm saves the weight for the input's gradient
        if quant is WeightsQuant.NONE and count == 1 and tokens == self.t:
            # F.linear of the (batch, seq, features) activations: the input's gradient comes back through
            # ViewBackward0, a view of MmBackward0's (aten/src/ATen/native/Linear.cpp: matmul folds the 3-D input)
            tp.ops[-1].view_grad_in = True
        if pg and not bias and quant is WeightsQuant.NONE:
            # F.linear of a 3-D input without a bias is an mm on its 2-D view: MmBackward0 computes the weight's
            # gradient before the input's (addmm, with a bias, the input's first)
            tp.ops[-1].weight_first = True
        if lora_rank:
            y = self.lora(x, y, fin, fout, lora_rank, name)
        return y

    def proj(self, x: Tensor, fin: int, fout: int, name: str, bias: bool = False, count: int = 1) -> Tensor:
        """A projection of the layer plan: trainable and quantized as the plan says, with LoRA where ``name`` is one
        of the plan's targets."""
        plan = self.plan
        assert plan is not None
        return self.linear(x, fin, fout, name, bias=bias, trainable=plan.trainable, quant=plan.quant,
                           lora_rank=plan.lora_rank if name in plan.lora_targets else 0, count=count)

    def lora(self, x: Tensor, y: Tensor, fin: int, fout: int, r: int, name: str) -> Tensor:
        """peft ``lora.Linear``: ``result + lora_B(lora_A(x.to(fp32))) * scaling`` then cast back."""
        num, plan = self.num, self.plan
        drop = plan.lora_dropout if plan is not None else 0.0
        elem = num.lora_param
        b, bs = lora_branch(self.tp, x, x.numel // fin, fout, r, adapter_elem=elem, amp=num.amp,
                            params_a=self.param_grad(name + ".A", r * fin, elem),
                            params_b=self.param_grad(name + ".B", fout * r, elem),
                            dropout=lambda t: self.dropout(t, drop) if drop > 0 else t)
        if self.plan is not None and self.plan.dora:
            return self.cast(self.dora(y, b, fin, fout, r, name), y.elem)
        return self.cast(self.add(y, bs), y.elem)

    def dora(self, y: Tensor, lora_out: Tensor, fin: int, fout: int, r: int, name: str) -> Tensor:
        """peft ``DoraLinearLayer.forward`` (peft/tuners/lora/dora.py, 0.21): ``B(A(eye(in)))`` rebuilds the
        adapter's weight (fp32, in x out), the base weight is cast to the input dtype and ``W + s * BA`` (detached)
        gives the row norms; all of it dies with the call (the rebuilt weight's graph is only referenced locally).
        Then ``(m / norm - 1) * base_result + (m / norm) * lora_B(lora_A(x)) * s``: the products save the
        base result and the adapter output for the magnitude's gradient."""
        tp = self.tp
        e = lora_out.elem
        eye = tp.op(fin * fin, e, (), rg=False)
        ae = tp.op(fin * r, e, (eye,), rg=False)
        lw = tp.op(fin * fout, e, (ae,), rg=False)
        wc = tp.op(fin * fout, e, (), rg=False)  # weight.to(x.dtype) (dequantized for 4-bit bases)
        sc = tp.op(fin * fout, e, (lw,), rg=False)  # scaling * lora_weight.detach()
        ws = tp.op(fin * fout, e, (wc, sc), rg=False)
        norm = tp.op(fout, e, (ws,), rg=False)
        mns = tp.op(fout, 4, (norm,), params=self.param_grad(name + ".m", fout, 4))  # magnitude / weight_norm
        m1 = tp.op(fout, 4, (mns,))  # mag_norm_scale - 1
        t1 = self.mul(m1, y, elem=max(4, y.elem))
        t2 = self.mul(mns, lora_out, elem=max(4, e))
        t3 = tp.op(t2.numel, t2.elem, (t2,))  # * scaling
        t4 = self.add(t1, t3)
        return self.add(y, t4)

    # ---- norms -------------------------------------------------------------------------------
    def norm(self, x: Tensor, dim: int, trainable: bool, scale: bool = True, weights: int = 0) -> Tensor:
        """The spec's norm over the last ``dim`` elements; ``scale`` False: an RMSNorm without a weight
        (Gemma4RMSNorm with_scale=False: the fp32 normalised states cast back); ``weights``: its parameters where they
        are not the config's norm over ``dim`` (per-head q/k norms with a (heads, head_dim) weight and no bias:
        Cohere, StableLM)."""
        spec, num = self.spec, self.num
        rows = x.numel // dim
        pelem = num.norm_param
        pg = self.param_grad(f"norm{len(self.tp.ops)}", weights or dim * (2 if spec.norm_bias else 1), pelem) \
            if trainable else ()
        if spec.norm is NormKind.LAYERNORM:
            xin = self.cast(x, 4) if num.amp else x  # autocast runs layer_norm in fp32
            return native_layer_norm(self.tp, xin, rows, params=pg, node=xin.rg or trainable)
        if spec.norm is NormKind.LAYERNORM_NO_AFFINE:
            # OlmoLayerNorm (modeling_olmo.py, transformers 5.24): F.layer_norm(x.to(fp32), shape, None, None)
            # .to(dtype): the fp32 copy and mean/rstd are saved for backward; no parameters
            x32 = self.cast(x, 4)
            stats = self.tp.op(2 * rows, 4, (), rg=False)
            out = self.tp.op(x.numel, 4, (x32, stats), save=(x32, stats) if x32.rg else (), grad_to=(x32,),
                             rg=x32.rg)
            return self.cast(out, x.elem)
        if spec.norm is NormKind.COHERE_LAYERNORM:
            # CohereLayerNorm (modeling_cohere2.py): x.to(fp32); mean; (x - mean).pow(2).mean; (x - mean) * rsqrt;
            # weight.to(fp32) * that; .to(input dtype)
            x32 = self.cast(x, 4)
            mean = self.tp.op(rows, 4, (x32,))
            d1 = self.tp.op(x.numel, 4, (x32, mean))
            sq = self.tp.op(x.numel, 4, (d1,), save=(d1,) if d1.rg else (), bwd_scratch=2 * x.numel * 4)
            var = self.tp.op(rows, 4, (sq,))
            rs = self.ew(var, save_out=True)
            d2 = self.tp.op(x.numel, 4, (x32, mean))
            n32 = self.mul(d2, rs)
            out = self.tp.op(x.numel, 4, (n32,), save=(n32,) if trainable else (), params=pg,
                             rg=n32.rg or trainable)
            return self.cast(out, x.elem)
        if spec.norm_kernel and scale and spec.norm is NormKind.RMSNORM:
            return self.liger_rms_norm(x, rows, dim, pg, trainable)
        # RMSNorm: hidden.to(fp32); pow(2).mean(-1); * rsqrt(var + eps); weight * hidden.to(input_dtype)
        n32 = rms_normalize(self.tp, x, dim)
        if not scale or spec.norm is NormKind.RMSNORM_NO_WEIGHT:  # Llama4TextL2Norm (NanoChat): ._norm(x.float())
            return self._keeps_input(x, self.cast(n32, x.elem))  # .type_as(x), no weight
        if spec.norm in (NormKind.GEMMA_RMSNORM, NormKind.FP32_WEIGHT_RMSNORM):
            # output * (1.0 + weight.float()); then .type_as(x) (NemotronHRMSNorm: weight.to(fp32) * output, the same
            # tensors)
            w1 = self.tp.op(dim, 4, (), rg=trainable)
            out = self.mul(n32, w1, elem=4)
            if trainable:
                self.tp.ops[-1].params = pg
            return self._keeps_input(x, self.cast(out, x.elem))
        nc = self.cast(n32, x.elem)
        # MulBackward0 makes the weight's gradient as grad * hidden at the output's shape; validate_outputs sums it
        # down to the weight's (derivatives.yaml mul_tensor_backward; torch/csrc/autograd/engine.cpp)
        oelem = max(pelem, nc.elem)
        out = self.tp.op(x.numel, oelem, (nc,), save=(nc,) if trainable else (), params=pg,
                         rg=nc.rg or trainable, bwd_scratch=x.numel * oelem if trainable else 0)
        self.bound_until_now(n32)  # ``return self.weight * hidden_states.to(input_dtype)``: fp32 local until return
        return out

    def liger_rms_norm(self, x: Tensor, rows: int, dim: int, pg: tuple[tuple[int, int], ...],
                       trainable: bool) -> Tensor:
        """kernels-community's LigerRMSNorm (liger-kernels ``rms_norm.py``, ``LigerRMSNormFunction`` with casting mode
        "llama" and ``in_place=True``), which transformers' hub kernels put in place of a decorated RMSNorm: the
        forward allocates the output in the input's dtype and the inverse RMS per row in fp32 and saves the input, the
        weight and that RSTD; the backward allocates a (SM count, hidden) fp32 partial weight gradient, writes the
        input gradient into the output gradient's buffer and reduces the partials (``_dW.sum(0).to(W.dtype)``)."""
        tp = self.tp
        needs = x.rg or trainable
        rstd = tp.op(rows, 4, (x,), rg=False)
        return tp.op(x.numel, x.elem, (x, rstd), save=(x, rstd) if needs else (), params=pg, grad_to=(x,), rg=needs,
                     passthrough=True, bwd_scratch=(LIGER_SM_COUNT + 1) * dim * 4 if needs else 0)

    # ---- attention ----------------------------------------------------------------------------
    def rope(self, x: Tensor, out_elem: int | None = None) -> Tensor:
        """``x * cos + rotate_half(x) * sin`` over the rotary part (cos/sin do not require grad)."""
        spec = self.spec
        frac = spec.rotary_fraction
        if spec.position is not PositionKind.ROPE or frac <= 0 or (self.plan is not None and not self.plan.rope):
            return x
        style = spec.rope_style
        if style == "chunk":
            # gpt-oss _apply_rotary_emb: x1, x2 = chunk(x, 2); cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin)), cos and
            # sin of head_dim / 2 in the states' dtype
            x1, x2 = self.tp.split(x, 2)
            first = self.tp.op(x1.numel, x.elem, (self.tp.op(x1.numel, x.elem, (x1,)),
                                                  self.tp.op(x2.numel, x.elem, (x2,))))
            second = self.tp.op(x1.numel, x.elem, (self.tp.op(x2.numel, x.elem, (x2,)),
                                                   self.tp.op(x1.numel, x.elem, (x1,))))
            return self.tp.op(x.numel, x.elem, (first, second))
        # the rotary part: int(head_dim * fraction) channels of every head (transformers' rotary dim)
        rot_dim = int(spec.head_dim * frac)
        part = x if frac >= 1 else self.tp.view(x, x.numel // spec.head_dim * rot_dim if x.numel % spec.head_dim == 0
                                                else int(x.numel * frac))
        if style == "every_two_fp32":
            # CodeGen's apply_rotary_pos_emb (modeling_codegen.py): sin/cos rows of the fp32 embed_positions table,
            # repeat_interleave'd per call; tensor * cos (fp32), rotate_every_two (stack(-x2, x1)) * sin (fp32), their
            # sum concatenated with the pass-through part (fp32), cast back by .to(value.dtype)
            rot_numel = self.s * int(spec.head_dim * frac)
            cos = self.tp.op(rot_numel, 4, (), rg=False)
            sin = self.tp.op(rot_numel, 4, (), rg=False)
            a = self.tp.op(part.numel, 4, (part, cos))
            neg = self.tp.op(part.numel // 2, x.elem, (part,))
            st = self.tp.op(part.numel, x.elem, (neg, part))
            b = self.tp.op(part.numel, 4, (st, sin))
            out = self.add(a, b)
            if frac < 1:
                out = self.tp.op(x.numel, 4, (out, x))
            return self.cast(out, x.elem)
        # cos/sin come in the hidden states' dtype (fp32 under autocast; ERNIE/Cohere keep fp32), and mul promotes
        elem = max(x.elem, resid_elem(self.num))
        src = part
        if style in ("fp32", "interleave_fp32", "fp32_tables"):
            elem = 4  # fp32_tables: the rotary module returns fp32 cos/sin (OLMo), so q * cos promotes to fp32
            if style == "fp32":  # q.float() first (modeling_cohere2.py)
                src = self.cast(part, 4)
                if out_elem is None:
                    out_elem = x.elem
        if style in ("interleave", "interleave_fp32"):
            # cos[..., :half].repeat_interleave(2, -1) and the same for sin (modeling_glm4.py / modeling_ernie4_5.py):
            # (batch, 1, seq, rotary) copies, made for q's and k's call alike
            cs_elem = 4 if style == "interleave_fp32" or self.num.amp else self.num.act
            rot_numel = self.s * int(spec.head_dim * frac)  # position_ids (1, seq): no batch dimension
            cos = self.tp.op(rot_numel, cs_elem, (), rg=False)
            sin = self.tp.op(rot_numel, cs_elem, (), rg=False)
            ins: tuple[Tensor, ...] = (cos, sin)
        else:
            ins = ()
        if style == "fp32_each":  # (q.float() * cos) + (rotate_half(q.float()) * sin): two fp32 copies (ModernBERT)
            a = self.tp.op(part.numel, 4, (self.cast(src, 4),))
            s32 = self.cast(src, 4)
            half = self.tp.op(part.numel // 2, 4, (s32,))
            rot = self.tp.op(part.numel, 4, (half, s32))
            b = self.tp.op(part.numel, 4, (rot,))
        elif style == "interleave_fp32":  # q.float() * cos + rotate_half(q).float() * sin
            a32 = self.cast(src, 4)
            a = self.tp.op(part.numel, 4, (a32, *ins[:1]))
            half = self.tp.op(part.numel // 2, x.elem, (src,))  # -x2
            rot = self.tp.op(part.numel, x.elem, (half, src))  # cat
            r32 = self.cast(rot, 4)
            b = self.tp.op(part.numel, 4, (r32, *ins[1:]))
        else:
            a = self.tp.op(part.numel, elem, (src, *ins[:1]))  # x * cos
            half = self.tp.op(part.numel // 2, src.elem, (src,))  # -x2
            rot = self.tp.op(part.numel, src.elem, (half, src))  # cat
            b = self.tp.op(part.numel, elem, (rot, *ins[1:]))  # * sin
        out = self.add(a, b)
        if style in ("fp32", "interleave_fp32", "fp32_tables"):
            out = self.cast(out, out_elem or x.elem)  # .to(original dtype)
        if frac < 1 or spec.rope_cat:
            out = self.tp.op(x.numel, out.elem, (out, x))  # cat with the pass-through part (empty at frac 1)
        return out

    def dsa_mask(self, n: Tensor, q_resid: Tensor) -> Tensor:
        """DeepSeek Sparse Attention (modeling_deepseek_v32.py): ``DeepseekV32Indexer.forward`` under no_grad, then the
        attention's mask of the selected keys. The indexer projects ``q_resid`` (the normed q latent) to index heads and
        the hidden states to one key (``wk``, LayerNorm ``k_norm``), rotates their rotary parts, scores every key per
        index head in fp32 (``q.float() @ k.float()^T``: matmul's broadcast copies the keys for every query position,
        (B, S, D_idx, T) fp32; then scaled and ReLU'd, (B, S, H_idx, T) fp32 each), sums the heads weighted by
        ``weights_proj`` (fp32), masks the causal part and takes the top-k indices
        (int64, cast to int32). The attention scatters them into a new (B, S, T) boolean mask and combines it with the
        causal mask (``&`` of the SDPA boolean mask, ``masked_fill`` of eager's float mask). Inference caches the
        indexer keys (``cache.update_indexer``: (B, T, D_idx))."""
        spec, tp = self.spec, self.tp
        b, s, t = self.b, self.s, self.kv_len
        hi, di, rd = spec.index_heads, spec.index_head_dim, spec.qk_rope_head_dim
        act = n.elem
        sel = min(spec.index_topk, t)
        eager = self.kernel_for(True) in (Kernel.EAGER, Kernel.MATH)
        qi = tp.op(b * s * hi * di, act, (q_resid,), rg=False)  # wq_b(q_resid)
        ki = tp.op(b * s * di, act, (n,), rg=False)  # wk(hidden_states)
        if spec.index_fp32_weights:  # HYV4Indexer: k_norm(wk(x).to(fp32)) in fp32, cast back
            kn = self.cast(tp.op(b * s * di, 4, (self.cast(ki, 4),), rg=False), act)
        else:
            kn = tp.op(b * s * di, act, (ki,), rg=False)  # k_norm
        q_rot = self.rope(tp.view(qi, b * s * hi * rd))
        k_rot = self.rope(tp.view(kn, b * s * rd))
        qc = tp.op(b * s * hi * di, act, (q_rot, qi), rg=False)  # cat([q_rot, q_pass])
        kc = tp.op(b * s * di, act, (k_rot, kn), rg=False)
        if not self.num.training:  # cache.update_indexer: torch.cat onto the cached indexer keys
            kc = tp.op(b * t * di, act, (kc,), rg=False, kind=KV)
            tp.keep(kc)
        q32 = tp.op(qc.numel, 4, (qc,), rg=False)
        k32 = tp.op(b * t * di, 4, (kc,), rg=False)
        # torch.matmul broadcasts the (B, 1, D, T) keys against (B, S, H, D): expand + reshape copies them for every
        # query position, (B, S, D, T) in fp32, before one bmm
        kx = tp.op(b * s * di * t, 4, (k32,), rg=False)
        sc = tp.op(b * s * hi * t, 4, (q32, kx), rg=False)  # matmul
        sc = tp.op(sc.numel, 4, (sc,), rg=False)  # * softmax_scale
        sc = tp.op(sc.numel, 4, (sc,), rg=False)  # relu
        if spec.index_fp32_weights:  # HYV4Indexer: weights_proj (fp32) of hidden_states.to(fp32)
            w = tp.op(b * s * hi, 4, (tp.op(n.numel, 4, (n,), rg=False),), rg=False)
        else:
            w = tp.op(b * s * hi, act, (n,), rg=False)  # weights_proj
            w = tp.op(w.numel, 4, (w,), rg=False)  # .float()
        w = tp.op(w.numel, 4, (w,), rg=False)  # * n_heads ** -0.5
        isc = tp.op(b * s * t, 4, (w, sc), rg=False)  # (B, S, 1, H) @ (B, S, H, T)
        if eager:  # + the float causal mask
            isc = tp.op(isc.numel, 4, (isc,), rg=False)
        else:  # masked_fill(~mask, -inf)
            isc = tp.op(isc.numel, 4, (isc, tp.op(b * s * t, 1, (), rg=False)), rg=False)
        vals = tp.op(b * s * sel, 4, (isc,), rg=False)  # topk values (unused) and indices
        idx = tp.op(b * s * sel, 8, (isc, vals), rg=False)
        idx = tp.op(idx.numel, 4, (idx,), rg=False)  # .to(torch.int32): what the indexer returns
        return self.dsa_index_mask(idx)

    def dsa_index_mask(self, idx: Tensor | None = None) -> Tensor:
        """The attention's mask of the indexer's top-k ``idx`` (int32; None: a layer reusing the previous indexer
        layer's, HY-V4's "shared" layers): ``topk_indices.long()``, scattered into a new (B, S, T) boolean mask,
        combined with the causal mask."""
        spec, tp = self.spec, self.tp
        b, s, t = self.b, self.s, self.kv_len
        eager = self.kernel_for(True) in (Kernel.EAGER, Kernel.MATH)
        act = 2 if self.num.amp else self.num.act
        # topk_indices.long() (a shared layer's indices are the previous layer's, held by the decoder loop)
        idx = tp.op(b * s * min(spec.index_topk, t), 8, (idx,) if idx is not None else (), rg=False)
        ones = tp.op(b * s * t, 1, (), rg=False)  # new_ones((B, S, T), dtype=bool)
        index_mask = tp.op(b * s * t, 1, (ones, idx), rg=False)  # .scatter(-1, idx, False)
        if eager:  # attention_mask.masked_fill(index_mask, min)
            return tp.op(b * s * t, act, (index_mask,), rg=False)
        inv = tp.op(b * s * t, 1, (index_mask,), rg=False)  # ~index_mask
        return tp.op(b * s * t, 1, (inv,), rg=False)  # attention_mask & ~index_mask

    def rope_complex(self, x: Tensor) -> Tensor:
        """DeepSeek-V2's apply_rotary_emb (modeling_deepseek_v2.py): ``view_as_complex(x.float())`` (an fp32 copy),
        times the complex64 ``freqs_cis`` (a new complex tensor of the same bytes; the product saves only the
        constant table), ``view_as_real(...).flatten(3).type_as(x)`` (cast back)."""
        x32 = self.cast(x, 4)
        prod = self.tp.op(x.numel, 4, (x32,))
        return self.cast(prod, x.elem)

    def rope_fp32_pair(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Cohere's apply_rotary_pos_emb: ``q = q.float(); k = k.float()`` first, then both rotations; every
        input and fp32 copy stays referenced until it returns (modeling_cohere2.py). With fp32 cos/sin tables
        (``rope_style`` fp32_tables, modeling_olmo.py): no up-cast, the products promote to fp32, and both are
        cast back with ``q_embed.to(q_type), k_embed.to(k_type)`` at the return."""
        up = self.spec.rope_style == "fp32"
        q32, k32 = (self.cast(q, 4), self.cast(k, 4)) if up else (q, k)
        qe = self.rope(q32, out_elem=4)
        ke = self.rope(k32, out_elem=4)
        end = len(self.tp.ops) - 1
        qe, ke = self.cast(qe, q.elem), self.cast(ke, k.elem)  # return q_embed.to(dtype), k_embed.to(dtype)
        for t in (q, k, q32, k32):
            root = t.base if t.base is not None else t
            root.last_use = max(root.last_use, end)
        return qe, ke

    def dynamic_mask(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Doge's dynamic mask (modeling_doge.py ``DogeAttention.forward`` / ``prepare_dynamic_mask``, transformers
        5.24): ``dt_proj`` over the values (in inference the cache's values, transposed and reshaped: a copy), then
        ``exp(A * softplus(dt))`` per key-value head and key; the model's boolean causal mask made additive
        (``torch.where``: the hidden dtype) and compared ``!= 0`` (a bool mask that ``masked_fill``'s backward
        saves); ``masked_fill`` of the expanded dt writes a new (batch, kv heads, q, kv) float mask, whose gradient is
        a full-size temporary summed down to dt's shape; beyond ``keep_window_size`` keys, ``zeros_like``, the top-k
        indices, their scatter and a second ``masked_fill``; ``repeat_kv`` copies it to every query head."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        b, s, skv, kvh, kvd = self.b, self.s, self.kv_len, spec.num_kv_heads, spec.kv_dim
        tr = plan.trainable
        vv = tp.op(b * skv * kvd, v.elem, (v,)) if not self.num.training else v
        dt = self.proj(vv, kvd, kvh, "dt_proj", spec.qkv_bias)
        sp = self.ew(dt, save_in=True)  # softplus saves its input
        pg = self.param_grad(f"A{len(tp.ops)}", kvh, self.num.param) if tr else ()
        ad = tp.op(sp.numel, max(sp.elem, self.num.param), (sp,), save=(sp,) if tr else (), params=pg,
                   rg=sp.rg or tr)
        ex = self.ew(ad, save_out=True)  # exp saves its result
        hid = self.num.act
        full = b * kvh * s * skv
        additive = tp.op(b * s * skv, hid, (), rg=False)  # torch.where(attention_mask, 0.0, min_dtype)
        ne = tp.op(b * s * skv, 1, (additive,), rg=False)  # attention_mask != 0
        mask = tp.op(full, ex.elem, (ex, ne), save=(ne,) if ex.rg else (), grad_to=(ex,),
                     bwd_scratch=full * ex.elem if ex.rg else 0)
        if skv > spec.keep_window:
            zeros = tp.op(full, hid, (), rg=False)
            idx = tp.op(b * kvh * s * spec.keep_window, 8, (mask,), rg=False,
                        fwd_scratch=b * kvh * s * spec.keep_window * mask.elem)  # topk values and indices
            active = tp.op(full, hid, (zeros, idx), rg=False)  # scatter
            off = tp.op(full, 1, (active,), rg=False)  # active_mask == 0.0
            mask = tp.op(full, mask.elem, (mask, off), save=(off,) if mask.rg else (), grad_to=(mask,))
        if spec.num_heads != kvh:  # repeat_kv: expand + reshape copies
            mask = tp.op(b * spec.num_heads * s * skv, mask.elem, (mask,))
        tp.hold(additive)  # prepare_dynamic_mask rebinds attention_mask to it: held until the function returns
        return mask, ex

    def sdpa_bias(self, elem: int) -> Tensor:
        """The additive mask SDPA makes of transformers' boolean (B, 1, S, S_kv) mask (a sliding window or chunk
        beyond the sequence): ``convert_boolean_attn_mask`` writes a new one in the query dtype, and the efficient
        kernel's ``preprocess_mask`` pads a key length that is not a multiple of 8 (``pad_bias``: a second, padded
        copy of the same (B, 1, S, S_kv) shape, the first freed). The kernel saves it for backward
        (aten/src/ATen/native/transformers/attention.cpp, torch 2.4+)."""
        tp, b, s, skv = self.tp, self.b, self.s, self.kv_len
        bias = tp.op(b * s * skv, elem, (), rg=False)
        if skv % MEM_EFF_MASK_ALIGNMENT:
            bias = tp.op(b * s * (skv - skv % MEM_EFF_MASK_ALIGNMENT + MEM_EFF_MASK_ALIGNMENT), elem, (bias,),
                         rg=False)
        return bias

    def attention_core(self, q: Tensor, k: Tensor, v: Tensor, kernel: Kernel, heads_kv: int,
                       masked: bool = False, bias: Tensor | None = None) -> Tensor:
        """Attention over (B, H, S, d) q and (B, Hkv, S_kv, d) k/v; returns the (B, S, H*d) output. ``masked``:
        transformers passes SDPA a materialised boolean mask (see :meth:`sdpa_bias`); ``bias``: a float mask the
        model computed — with ``masked``, the attention mask itself (Doge's dynamic mask), which the efficient kernel
        saves and, where it requires grad, returns a gradient for; without, a position bias added to the scores beside
        the causal mask (vramplan.inkling)."""
        spec, tp = self.spec, self.tp
        b, s, skv, h, d = self.b, self.s, self.kv_len, spec.num_heads, spec.head_dim
        dv = spec.value_head_dim
        elem = q.elem
        p_drop = spec.attention_dropout if self.num.training else 0.0
        rg = q.rg or k.rg or v.rg
        if kernel in (Kernel.FLASH, Kernel.EFFICIENT):
            extra: tuple[Tensor, ...] = ()
            if bias is not None and kernel is Kernel.EFFICIENT:
                extra = (bias,)
            elif masked and kernel is Kernel.EFFICIENT and s > 1:
                extra = (self.sdpa_bias(elem),)
            return fused_sdpa(tp, q, k, v, kernel, batch=b, heads=h, sq=s, skv=skv, head_dim=d, value_dim=dv,
                              heads_kv=heads_kv, extra=extra,
                              extra_grads=(bias,) if bias is not None and bias.rg else ())
        if kernel is Kernel.MATH:
            # transformers' SDPA path passes enable_gqa without a mask (use_gqa_in_sdpa); Falcon's own attention never
            own = self.plan is not None and own_falcon_attention(spec, self.plan.release)
            gqa = heads_kv != h and not masked and (bias is not None or (d <= 256 and not own))

            def mask() -> Tensor | None:
                if bias is not None and not masked:
                    return bias
                if masked and s > 1:  # transformers' boolean mask converted to the query dtype
                    return tp.op(b * s * skv, q.elem, (), rg=False)
                return tp.op(s * skv, 4, (), rg=False) if s > 1 else None  # is_causal: ones(L, S).tril(), in fp32

            # (a float mask of its own is how a GQA layer reaches this kernel with enable_gqa: vramplan.inkling)
            return math_sdpa(tp, q, k, v, batch=b, heads=h, sq=s, skv=skv, head_dim=d, value_dim=dv,
                             heads_kv=heads_kv, enable_gqa=gqa, mask=mask,
                             dropout=lambda t: self.dropout(t, p_drop) if p_drop > 0 else t)
        scores = b * h * s * skv
        # eager (transformers' eager_attention_forward): the scores in the model dtype, a float mask
        if heads_kv != h:  # repeat_kv: expand + reshape copies
            k = tp.op(b * h * skv * d, elem, (k,))
            v = tp.op(b * h * skv * dv, elem, (v,))
        if spec.attention_sinks and spec.sink_lse:
            return self.sink_lse_attention(q, k, v, rg)
        if spec.attention_sinks and spec.sink_fp32:
            return self.sink_fp32_attention(q, k, v, rg)
        if spec.attention_sinks or spec.eager_max_softmax:
            return self.sink_attention(q, k, v, rg)
        upcast = spec.family == "gptj" or spec.attn_fp32  # GPT-J, GPT-Neo compute the scores in fp32
        qe, ke = (self.cast(q, 4), self.cast(k, 4)) if upcast else (q, k)
        selem = 4 if upcast else elem
        zeros = tp.op(scores, selem, (), rg=False) if spec.scores_zeros else None  # baddbmm's input, a local
        att = tp.op(scores, selem, (qe, ke) + ((zeros,) if zeros else ()), save=(qe, ke) if rg else ())
        raw = att
        if not spec.scores_kept and not spec.scores_zeros:  # (baddbmm's alpha is the scaling)
            att = tp.op(scores, selem, (att,))  # * scaling
        if spec.attn_logit_softcap:
            att = tp.op(scores, selem, (att,))
            att = self.ew(att, save_out=True)
            att = tp.op(scores, selem, (att,))
        if spec.scores_bias_fp32:
            # MptAttention: scores + the fp32 ALiBi bias (H, 1, S) promotes the sum to fp32; masked_fill with the
            # boolean causal mask (saving only the mask) and softmax(scores.float()) stay fp32
            att = tp.op(scores, 4, (att,))
            selem = 4
        if bias is not None and not masked:  # + position_bias
            att = tp.op(scores, selem, (att, bias))
        att = tp.op(scores, selem, (att,))  # + causal mask
        # LLaMA-style eager code (and OPT's) calls softmax(dtype=float32).to(dtype); GPT-2 and Falcon keep the
        # scores' dtype, except under autocast, whose CUDA policy runs softmax in fp32 for every caller
        # (torch/csrc/autograd/autocast_mode / aten/src/ATen/autocast_mode.cpp: softmax is an fp32 op).
        # softmax saves its result.
        # (Llama 4's and GPT-NeoX-Japanese's eager softmax(attn_weights, dim=-1) in the scores' dtype as well)
        native = spec.family == "gpt2" or (self.plan is not None and own_falcon_attention(spec, self.plan.release))
        pelem = selem if (native or spec.eager_softmax_native) and not self.num.amp else 4
        # A 16-bit input reaching an fp32 softmax is first copied to fp32 (autocast's cast, or ATen's
        # softmax(input, dim, dtype): only a Half input with dtype=float32 takes the fused half_to_float kernel,
        # bf16 is converted with toType; aten/src/ATen/native/SoftMax.cpp): the copy lives during the kernel.
        upcast_copy = scores * 4 if pelem == 4 and selem == 2 and (self.num.amp or not self.num.fp16) else 0
        probs32 = tp.op(scores, pelem, (att,), fwd_scratch=upcast_copy)
        if rg:
            tp.save_output(probs32)
        probs = self.cast(probs32, elem)
        probs = self.dropout(probs, p_drop)
        self.probs = probs  # the attention weights the layer returns (spec.returns_attn_weights)
        out = tp.op(b * s * h * dv, elem, (probs, v), save=(probs, v) if rg else ())
        tp.hold(q, k, v)  # query, key_states, value_states (repeat_kv's copies): the function's locals
        if spec.scores_held:  # MptAttention's attention_scores (the masked scores) is a local until it returns
            att.last_use = len(tp.ops) - 1
        if zeros is not None:
            zeros.last_use = len(tp.ops) - 1
        if upcast:  # GPT-J's (GPT-Neo's) _attn rebinds query/key to their fp32 copies: they live until it returns
            qe.last_use = ke.last_use = len(tp.ops) - 1
        if spec.scores_kept:
            raw.last_use = max(raw.last_use, len(tp.ops) - 1)
        return out

    def sink_attention(self, q: Tensor, k: Tensor, v: Tensor, rg: bool) -> Tensor:
        """gpt-oss eager_attention_forward (modeling_gpt_oss.py): scores * scaling + mask, ``cat`` with the per-head
        sink logit (one more column), minus the row max, softmax in the scores' dtype, the sink column sliced off
        before the product with v. ``attn_weights`` (scores + mask) and the max-subtracted logits stay referenced
        until the function returns.

        ``spec.eager_max_softmax`` (modeling_mimo_v2_flash.py eager_attention_forward): the same steps, the ``cat``
        only on layers with sinks, and every step rebinds ``attn_weights``, so each intermediate dies at its last
        use."""
        spec, tp, plan = self.spec, self.tp, self.plan
        b, s, skv, h = self.b, self.s, self.kv_len, spec.num_heads
        sinks = spec.attention_sinks
        elem, scores = q.elem, b * h * s * self.kv_len
        wide = b * h * s * (skv + 1) if sinks else scores
        dv = v.numel // (b * h * skv)  # the values' head size (MLA, MiMo-V2-Flash: v_head_dim)
        att = tp.op(scores, elem, (q, k), save=(q, k) if rg else ())  # matmul(q, k^T)
        att = tp.op(scores, elem, (att,))  # * scaling
        att = tp.op(scores, elem, (att,))  # + attention_mask
        tr = plan is not None and plan.trainable
        # fp32 sinks (HY-V4 keeps them in fp32) promote the concatenated logits, and all that follows, to fp32
        le = 4 if sinks and spec.sinks_fp32 else elem
        if sinks:
            sink = self.param_grad(f"sinks{len(tp.ops)}", h, 4 if spec.sinks_fp32 else self.num.param) if tr else ()
            cat = tp.op(wide, le, (att,), params=sink, rg=att.rg or tr)  # cat([scores, sinks.expand(...)], -1)
        else:
            cat = att
        idx = tp.op(b * h * s, 8, (cat,), rg=False)  # max(dim=-1): the indices, saved by MaxBackward0
        mx = tp.op(b * h * s, le, (cat, idx), save=(idx,) if cat.rg else (), grad_to=(cat,))
        # combined - max: SubBackward0 hands the gradient to the logits and makes -grad at full size for the max
        sub = tp.op(wide, le, (cat, mx), passthrough=True, bwd_scratch=wide * le if cat.rg else 0)
        probs = tp.op(wide, le, (sub,))  # softmax(dtype=the logits' dtype) saves its result
        if probs.rg:
            tp.save_output(probs)
        pv = tp.view(probs, scores) if sinks else probs  # probs[..., :-1]
        if le != elem:  # scores.to(value_states.dtype): a copy of the sliced probabilities
            pv = tp.op(scores, elem, (pv,))
        self.probs = pv  # the attention weights the function returns
        out = tp.op(b * s * h * dv, elem, (pv, v), save=(pv, v) if rg else ())
        if not spec.eager_max_softmax:
            att.last_use = sub.last_use = len(tp.ops) - 1
        tp.hold(q, k, v)  # query, key_states, value_states (repeat_kv's copies): the function's locals
        return out

    def sink_fp32_attention(self, q: Tensor, k: Tensor, v: Tensor, rg: bool) -> Tensor:
        """Flint's eager_attention_forward (modeling_flint.py, transformers 5.24): ``matmul(query.float(),
        key_states.float())`` (k already repeated to every head in its own dtype) times the scaling, plus the mask, in
        fp32; ``softmax(cat([scores, sinks.expand(...)]))`` in fp32 (the sinks are an fp32 parameter:
        ``_keep_in_fp32_modules_strict``), without a max subtraction; ``[..., :-1].to(value dtype)`` copies the sliced
        weights; their product with v. The cat and the fp32 softmax are temporaries (the softmax saves its result for
        backward); the masked scores stay bound to ``attn_weights`` until the cast back is assigned to it."""
        spec, tp, plan = self.spec, self.tp, self.plan
        b, s, skv, h = self.b, self.s, self.kv_len, spec.num_heads
        elem, scores, wide = q.elem, b * h * s * skv, b * h * s * (skv + 1)
        q32, k32 = self.cast(q, 4), self.cast(k, 4)
        att = tp.op(scores, 4, (q32, k32), save=(q32, k32) if rg else ())  # matmul in fp32
        att = tp.op(scores, 4, (att,))  # * scaling
        att = tp.op(scores, 4, (att,))  # + attention_mask (promoted to fp32)
        tr = plan is not None and plan.trainable
        sink = self.param_grad(f"sinks{len(tp.ops)}", h, 4) if tr else ()
        cat = tp.op(wide, 4, (att,), params=sink, rg=att.rg or tr)  # cat([scores, sinks.expand(...)], -1)
        probs = tp.op(wide, 4, (cat,))  # softmax(dim=-1): fp32 in, fp32 out, saves its result
        if probs.rg:
            tp.save_output(probs)
        pb = tp.op(scores, elem, (tp.view(probs, scores),))  # [..., :-1].to(value_states.dtype): a new tensor
        tp.hold(att)  # ``attn_weights`` (scores + mask) is rebound only once that whole line has run
        pb = self.dropout(pb, spec.attention_dropout if self.num.training else 0.0)
        self.probs = pb
        out = tp.op(b * s * h * spec.value_head_dim, elem, (pb, v), save=(pb, v) if rg else ())
        tp.hold(q, k, v)  # query, key_states, value_states: the function's locals
        return out

    def sink_lse_attention(self, q: Tensor, k: Tensor, v: Tensor, rg: bool) -> Tensor:
        """GraniteSWA eager_attention_forward (modeling_granite_swa.py, transformers 5.24): scores * scaling + mask;
        ``lse = logsumexp(scores, -1)`` (ATen's logsumexp: amax, then ``(x - max).exp_()`` summed, a temporary of the
        scores' size; autograd saves its input and result, and its backward rebuilds ``(x - lse).exp()`` at full
        size); ``sigmoid((lse - sinks).to(fp32))`` (saves its result); softmax(dtype=fp32) cast back; the product with
        v; ``attn_output * sink_scale.unsqueeze(-1).to(dtype)`` (saves both)."""
        spec, tp, plan = self.spec, self.tp, self.plan
        b, s, skv, h, d = self.b, self.s, self.kv_len, spec.num_heads, spec.value_head_dim
        elem, scores, rows = q.elem, b * h * s * skv, b * h * s
        att = tp.op(scores, elem, (q, k), save=(q, k) if rg else ())  # matmul(q, k^T)
        att = tp.op(scores, elem, (att,))  # * scaling
        att = tp.op(scores, elem, (att,))  # + attention_mask
        mx = tp.op(rows, elem, (att,), rg=False)  # amax
        lse = tp.op(rows, elem, (att, mx), save=(att,) if att.rg else (), grad_to=(att,), fwd_scratch=scores * elem,
                    bwd_scratch=2 * scores * elem if att.rg else 0)
        if lse.rg:
            tp.save_output(lse)
        tr = plan is not None and plan.trainable
        sink = self.param_grad(f"sinks{len(tp.ops)}", h, self.num.param) if tr else ()
        diff = tp.op(rows, elem, (lse,), params=sink, rg=lse.rg or tr)  # lse - sinks.view(1, -1, 1)
        scale = self.ew(self.cast(diff, 4), save_out=True)  # .to(float32).sigmoid()
        upcast_copy = scores * 4 if elem == 2 and (self.num.amp or not self.num.fp16) else 0
        probs32 = tp.op(scores, 4, (att,), fwd_scratch=upcast_copy)  # softmax(dtype=float32) saves its result
        if probs32.rg:
            tp.save_output(probs32)
        probs = self.dropout(self.cast(probs32, elem), spec.attention_dropout if self.num.training else 0.0)
        self.probs = probs
        out = tp.op(b * s * h * d, elem, (probs, v), save=(probs, v) if rg else ())
        return self.mul(out, self.cast(scale, elem))

    def kernel_for(self, has_mask: bool, elem: int | None = None) -> Kernel:
        """The attention kernel this layer runs (``elem``: the queries' element size where it is not the model's
        activation dtype)."""
        attn = self.plan.attention if self.plan else Attention.SDPA
        return attention_kernel(self.spec, attn, 2 if self.num.amp else elem or self.num.act, has_mask,
                                self.plan.release if self.plan else _release(MODELLED_TRANSFORMERS))

    # ---- whole blocks ---------------------------------------------------------------------------
    def self_attention(self, n: Tensor) -> Tensor:
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, qd, kvd = spec.hidden_size, spec.q_dim, spec.kv_dim
        b, s, skv, d = self.b, self.s, self.kv_len, spec.head_dim
        vd, od = spec.v_dim, spec.num_heads * spec.value_head_dim  # the values' and the attention output's widths
        tr = plan.trainable

        lin = self.proj

        if spec.kv_lora_rank:
            return self.mla(n)
        # flash-attn takes the window as an argument (window_size): no mask, for padded and packed batches alike
        own_falcon = own_falcon_attention(spec, plan.release)
        has_mask = ((plan.sliding and window_masked(spec, skv)) or mask_always(spec, plan.release)) and \
            plan.attention is not Attention.FLASH
        kernel = self.kernel_for(has_mask)
        heads_kv = spec.num_kv_heads
        # Gemma4TextAttention.forward (modeling_gemma4.py, which its v_norm marks): q_proj, q_norm and RoPE on the query
        # before k_proj / v_proj run, then k_norm and RoPE on the keys, then v_norm; other attentions project all three
        q_first = (spec.v_norm and spec.qk_norm and not spec.qk_norm_after_rope and not spec.qk_norm_full
                   and not spec.qk_norm_head_weights and not spec.qk_norm_split and spec.rope_style not in
                   ("fp32", "fp32_tables", "fp32_each", "complex"))
        if spec.attn_gpt1:
            return self.gpt1_attention(n)
        if spec.qkv_fused:
            name = spec.qkv_name or {"gpt2": "c_attn", "phi3": "qkv_proj"}.get(spec.family, "query_key_value")
            qkv = lin(n, h, qd + 2 * kvd, name, spec.qkv_bias)
            if spec.qkv_clamp:  # qkv_states.clamp(min=-clip_qkv, max=clip_qkv): a new tensor; clamp saves its input
                qkv = tp.op(qkv.numel, qkv.elem, (qkv,), save=(qkv,) if qkv.rg else ())
            q = tp.view(qkv, b * s * qd)
            k = tp.view(qkv, b * s * kvd)
            v = tp.view(qkv, b * s * kvd)
            if own_falcon and heads_kv == 1:
                # multi-query: k and v are taken with list indexing, which copies
                k = tp.op(b * s * d, qkv.elem, (qkv,))
                v = tp.op(b * s * d, qkv.elem, (qkv,))
            elif own_falcon and heads_kv != spec.num_heads:
                # new decoder architecture: k/v broadcast to every query head, then flattened (copies)
                k = tp.op(b * s * qd, qkv.elem, (qkv,))
                v = tp.op(b * s * qd, qkv.elem, (qkv,))
                heads_kv = spec.num_heads
            elif spec.family == "falcon" and 1 < heads_kv < spec.num_heads:
                # 5.25's new decoder architecture: the (kv heads, group + 2, d) view's query rows flattened over the
                # kv heads (a copy: the key and value rows sit between the groups); key and value are views
                q = tp.op(b * s * qd, qkv.elem, (qkv,))
            elif spec.family == "bloom":
                q = tp.op(b * s * qd, qkv.elem, (qkv,))  # transpose + reshape to (B*H, S, d) copies
                k = tp.op(b * s * kvd, qkv.elem, (qkv,))
            elif spec.qkv_copies:  # CodeGen: the mp_num-block split views are not head-contiguous; reshape copies
                q = tp.op(b * s * qd, qkv.elem, (qkv,))
                k = tp.op(b * s * kvd, qkv.elem, (qkv,))
                v = tp.op(b * s * kvd, qkv.elem, (qkv,))
        elif spec.kv_shared:
            return self.shared_kv_attention(n, lin, kernel)
        elif spec.attn_output_gate:
            # Qwen3NextAttention (modeling_qwen3_next.py): q_proj makes (heads, 2 x head_dim); chunk(2) gives the query
            # and the gate as strided views, and gate.reshape(*input_shape, -1) copies it
            qg = lin(n, h, 2 * qd, spec.qkv_names[0] if spec.qkv_names else "q_proj", spec.qkv_bias)
            q = tp.view(qg, b * s * qd)
            gate = tp.op(b * s * qd, qg.elem, (qg,), passthrough=True)
            k = lin(n, h, kvd, "k_proj", spec.qkv_bias)
            v = lin(n, h, kvd, "v_proj", spec.qkv_bias)
        elif spec.attn_fairseq:
            return self.fairseq_attention(n)

        else:
            qn, kn, vn = spec.qkv_names or ("q_proj", "k_proj", "v_proj")
            q = lin(n, h, qd, qn, spec.qkv_bias)
            if q_first:  # the query normed and rotated before the keys are projected (see above)
                q = self.call(self.rope, self.norm(q, d, tr))
            k = lin(n, h, kvd, kn, spec.qkv_bias)
            if spec.key_multiplier:  # Falcon-H1: k_proj(x) * key_multiplier
                k = tp.op(k.numel, k.elem, (k,))
            # attention_k_eq_v (modeling_gemma4.py): the values are the key projection itself
            v = k if spec.v_from_k else lin(n, h, vd, vn, spec.qkv_bias)
            if spec.value_scale:  # MiMoV2FlashAttention: v_proj(x)...transpose(1, 2) * v_scale (saves nothing)
                v = tp.op(v.numel, v.elem, (v,))
        # an early output gate's projection (modeling_afmoe.py: gate_states = self.gate_proj(hidden_states) after
        # v_proj), held by the attention's locals to its end
        gate_early = self.attn_gate_proj(n) if spec.attn_gate and spec.attn_gate_early else None
        if spec.qk_norm and not spec.qk_norm_after_rope:
            per_head = spec.qk_norm_head_weights
            if not q_first:
                q = self.norm(q, qd if spec.qk_norm_full else d, tr, weights=qd if per_head else 0)
            k = self.norm(k, kvd if spec.qk_norm_full else d, tr, weights=kvd if per_head else 0)
            if spec.qk_norm_split:  # StableLmLayerNormPerHead: torch.cat of the heads' norm outputs (a copy; the
                q = tp.op(q.numel, q.elem, (q,))  # per-head outputs are not saved)
                k = tp.op(k.numel, k.elem, (k,))
        if spec.v_norm and not q_first:  # Gemma4TextAttention.v_norm: a weightless RMSNorm over each head's values
            v = self.norm(v, d, tr, scale=False)
        if spec.rope_style in ("fp32", "fp32_tables", "fp32_each") and plan.rope:
            q, k = self.rope_fp32_pair(q, k)
        elif spec.rope_style == "complex" and plan.rope:  # modeling_llama4.py apply_rotary_emb: q and k as fp32
            q = self.call(self.rope_complex, q)  # complex numbers times freqs_cis, cast back
            k = self.call(self.rope_complex, k)
        elif q_first:  # Gemma 4: the keys rotated, then the values normed (the query was rotated above)
            k = self.call(self.rope, k)
            v = self.norm(v, d, tr, scale=False)
        else:
            # query_states, key_states = apply_rotary_pos_emb(query_states, key_states, ...): the caller's locals hold
            # the unrotated q and k until both rotations are done
            q0, k0 = q, k
            q = self.call(self.rope, q)
            k = self.call(self.rope, k)
            self.bound_until_now(q0, k0)
        if spec.qk_norm and spec.qk_norm_after_rope:  # modeling_hunyuan_v1_dense.py: norms of the rotated q/k
            q = self.norm(q, d, tr)
            k = self.norm(k, d, tr)
        if spec.qk_l2_norm and plan.rope:  # Llama4TextL2Norm (use_qk_norm and use_rope): x.float() normed, cast back
            q = self.norm(q, d, False, scale=False)
            k = self.norm(k, d, False, scale=False)
        if spec.nope_query_scale and not plan.rope:
            # BeamAttention with attention_scaling (the NoPE layers): (query_states.float() * attention_scaling)
            # .to(query_states.dtype): an fp32 copy, the fp32 product (saving only the small scale), the cast back
            q = self.cast(tp.op(q.numel, 4, (self.cast(q, 4),)), q.elem)
        if spec.nope_temperature and not plan.rope:
            # Llama4TextAttention with attn_temperature_tuning on a NoPE layer: positions = arange(s) (+ the cached
            # length); log1p(floor((positions.float() + 1) / floor_scale)) * attn_scale + 1 in fp32 ((s,): float, add,
            # div, floor, log1p, mul, add); (q * scales).to(q.dtype): the product promotes q to fp32, then the cast
            pos = tp.op(s, 8, (), rg=False)
            for _ in range(7):
                pos = tp.op(s, 4, (pos,), rg=False)
            q32 = tp.op(q.numel, 4, (q, pos), save=(pos,) if q.rg else (), grad_to=(q,))
            q = self.cast(q32, q.elem)
        if spec.attn_temperature:
            # modeling_ministral3.py: q * get_llama_4_attn_scale(position_ids, ...).to(q.dtype): the (1, 1, s, 1)
            # scale from position_ids in fp32 (div, floor, add, log, mul, add), cast, and a new q; the product's
            # backward needs only the small scale
            pos = tp.op(s, 4, (), rg=False)
            for _ in range(5):
                pos = tp.op(s, 4, (pos,), rg=False)
            scale = self.cast(pos, q.elem)
            q = tp.op(q.numel, q.elem, (q, scale), save=(scale,) if q.rg else (), grad_to=(q,))
        if not self.num.training:
            # DynamicCache.update: torch.cat onto the (initially empty) cached tensors, so the cache
            # holds copies of the post-RoPE keys and the values, in their own storage
            # (transformers 5.17's DynamicLayer allocates both in the keys' dtype: fp32 keys after RoPE under
            # autocast make fp32 values too)
            k0, v0 = k, v
            k = tp.op(b * skv * kvd, k.elem, (k,), kind=KV)
            v = tp.op(b * skv * vd, k.elem, (v,), kind=KV)
            tp.keep(k, v)
            # key_states, value_states = past_key_values.update(key_states, value_states, ...): the new keys and
            # values stay bound until update returns with both copies
            self.bound_until_now(k0, v0)
        if spec.kv_store:  # shared_kv_states[layer_type] = key_states, value_states: held until the forward returns
            tp.keep(k, v)
        if not self.num.amp and q.elem != self.num.act and kernel is not Kernel.EAGER:
            # the queries reach SDPA in another dtype than the model's: QLoRA's fp32 hidden states (the norms' fp32
            # weights after prepare_model_for_kbit_training; Linear4bit returns its input's dtype). fp32 rules out the
            # flash kernel, and with fewer key/value heads (enable_gqa) the efficient one too: the math kernel
            kernel = self.kernel_for(has_mask, q.elem)
        # query_states, key_states, value_states: the attention forward's locals until it returns (after o_proj)
        bound = (q, k, v)
        if self.num.amp and kernel is not Kernel.EAGER:
            q, k, v = self.cast(q, 2), self.cast(k, 2), self.cast(v, 2)  # autocast casts SDPA inputs
        if sdpa_repeats_kv(spec, has_mask) and heads_kv != spec.num_heads and \
                kernel in (Kernel.FLASH, Kernel.EFFICIENT):
            k, v = self._repeat_kv(k, b * skv * qd, heads_kv), self._repeat_kv(v, b * skv * od, heads_kv)
            heads_kv = spec.num_heads
        if spec.diff_attention:
            return self.diff_attention(q, k, v, kernel, heads_kv, has_mask)
        if spec.dynamic_mask:
            dyn, dts = self.dynamic_mask(v)
            out = self.attention_core(q, k, v, self.kernel_for(True), heads_kv, True, bias=dyn)
            o = self.proj(out, qd, h, "o_proj", spec.o_bias)
            tp.hold(dyn, dts)  # attn_mask and dt_states: locals of DogeAttention.forward until it returns
            return o
        out = self.attention_core(q, k, v, kernel, heads_kv, has_mask)
        if spec.family == "falcon":  # FalconAttention.forward's fused_qkv stays bound until it returns
            tp.hold(qkv)
        if spec.attn_head_gate:  # Lfm3Attention: attn_output * sigmoid(g_proj(x)).unsqueeze(-1), then a reshape
            gs = self.ew(lin(n, h, spec.num_heads, "g_proj", False), save_out=True)
            out = self.mul(out, gs)
        elif kernel in (Kernel.EAGER, Kernel.MATH):
            out = tp.op(out.numel, out.elem, (out,))  # transpose(1, 2).contiguous() copies
        oname = spec.o_name or ("o_proj" if (not spec.qkv_fused and spec.family != "phi") or spec.family == "phi3"
                                else "dense")
        if spec.sub_norms:  # modeling_bitnet.py: attn_sub_norm(attn_output) before o_proj (its input held until
            # the norm returns)
            out = self.call(lambda v: self.norm(v, qd, tr), out)
        if spec.attn_output_gate:  # attn_output * torch.sigmoid(gate): sigmoid saves its result, the product both
            out = self.mul(out, self.ew(gate, save_out=True))
        held: tuple[Tensor, ...] = ()
        if spec.attn_gate:
            out, held = self.attn_gate_apply(out, gate_early if gate_early is not None else self.attn_gate_proj(n))
        o = lin(out, od if not spec.qkv_fused else qd, h, oname, spec.o_bias)
        self.bound_until_now(*bound)
        if held:
            tp.hold(*held)
        if spec.attn_output_gate:
            tp.hold(gate)
        if spec.scores_held and spec.qkv_fused:  # the fused projection (and its q/k/v views) are the attention's
            tp.hold(qkv)  # locals (MptAttention.mixed_qkv, GPTNeoXJapaneseAttention.qkv)
        return self.dropout(o, spec.hidden_dropout)

    def attn_gate_proj(self, n: Tensor) -> Tensor:
        """The output gate's projection of the layer input (``spec.attn_gate``): heads or heads x head_dim outputs, no
        bias; plus the per-head gate bias where there is one (``gate_proj(x).view_as(attn_output) +
        gate_bias[None, None, :, None]``, modeling_beam.py: a new tensor)."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        name = spec.attn_gate_name
        width = spec.num_heads if spec.attn_gate_heads else spec.q_dim
        # "attn." keeps its gradient apart from an MLP linear of the same name (AFMoE's gate_proj)
        g = self.linear(n, spec.hidden_size, width, "attn." + name, bias=False, trainable=plan.trainable,
                        quant=plan.quant, lora_rank=plan.lora_rank if name in plan.lora_targets else 0)
        if spec.attn_gate_bias:
            pg = self.param_grad("attn.gate_bias", spec.num_heads, self.num.param) if plan.trainable else ()
            g = tp.op(g.numel, g.elem, (g,), params=pg, rg=g.rg or plan.trainable)
        return g

    def attn_gate_apply(self, out: Tensor, g: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``out * act(g)`` before o_proj; (the product, what the attention's locals hold to its end). sigmoid saves
        its result (the gate projection is the local: modeling_afmoe.py gate_states, modeling_beam.py gate);
        softplus_fp32 (modeling_laguna.py ``F.softplus(g.float()).to(dtype)``): the fp32 copy, softplus (saves its
        input), the cast back, which is the local. The product saves both (a per-head gate broadcasts over
        head_dim)."""
        if self.spec.attn_gate == "softplus_fp32":
            a = self.cast(self.ew(self.cast(g, 4), save_in=True), out.elem)
            return self.mul(out, a), (a,)
        return self.mul(out, self.ew(g, save_out=True)), (g,)

    def diff_attention(self, q: Tensor, k: Tensor, v: Tensor, kernel: Kernel, heads_kv: int,
                       masked: bool = False) -> Tensor:
        """DiffLlamaAttention (modeling_diffllama.py, transformers 5.24) after RoPE and the cache: each half of the
        values (chunked along the KV heads) ``repeat``ed to every KV head (two copies); two attention calls sharing q
        and k; their outputs concatenated over head_dim and chunked over the heads; ``attn_output1 - lambda_full *
        attn_output2`` (the product with the trainable lambda saves the second half, a view of the concatenation); a
        weightless RMSNorm over 2 x head_dim; times ``1 - lambda_init``; o_proj."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        qd = spec.q_dim
        v1 = tp.op(v.numel, v.elem, (v,))  # v.repeat(1, 2, 1, 1) of each chunk
        v2 = tp.op(v.numel, v.elem, (v,))
        outs = []
        for vi in (v1, v2):
            o = self.attention_core(q, k, vi, kernel, heads_kv, masked)
            if kernel in (Kernel.EAGER, Kernel.MATH):
                o = tp.op(o.numel, o.elem, (o,))  # transpose(1, 2).contiguous() copies
            outs.append(o)
        cat = tp.op(2 * outs[0].numel, outs[0].elem, tuple(outs))
        tr = plan.trainable
        half = tp.view(cat, cat.numel // 2)
        scaled = tp.op(half.numel, half.elem, (half,), save=(half,) if tr else ())  # lambda_full * attn_output2
        diff = tp.op(half.numel, half.elem, (half, scaled))  # attn_output1 - that
        normed = self.norm(diff, 2 * spec.head_dim, tr, scale=False)  # groupnorm: nn.RMSNorm without a weight
        out = tp.op(normed.numel, normed.elem, (normed,))  # (1 - lambda_init) * groupnorm(...)
        o = self.proj(out, qd, spec.hidden_size, spec.o_name or "o_proj", spec.o_bias)
        return self.dropout(o, spec.hidden_dropout)

    def fairseq_attention(self, n: Tensor) -> Tensor:
        """XGLMAttention (modeling_xglm.py, transformers 5.24; eager only): ``q_proj(x) * scaling``; k/v projected
        (inference: concatenated onto the cache); q, k and v reshaped to (batch x heads, seq, head_dim), a copy where
        the transposed view is not contiguous (the cached keys and values are); ``bmm`` scores in the model dtype plus
        the mask, clamped by ``torch.max`` with the dtype's minimum (maximum saves the sum); softmax in the scores'
        dtype (saves its result); dropout; ``bmm`` with the values; the output transposed back with a copy. The
        softmax output is returned and held by the layer until it returns (``hidden_states, _ = self.self_attn``)."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, qd, kvd = spec.hidden_size, spec.q_dim, spec.kv_dim
        b, s, skv, nh = self.b, self.s, self.kv_len, spec.num_heads
        lin = self.proj
        q = lin(n, h, qd, "q_proj", spec.qkv_bias)
        q = tp.op(q.numel, q.elem, (q,))  # * self.scaling
        k = lin(n, h, kvd, "k_proj", spec.qkv_bias)
        v = lin(n, h, kvd, "v_proj", spec.qkv_bias)
        if not self.num.training:  # DynamicCache.update: torch.cat copies, contiguous (B, H, T, d)
            k = tp.op(b * skv * kvd, k.elem, (k,), kind=KV)
            v = tp.op(b * skv * kvd, k.elem, (v,), kind=KV)
            tp.keep(k, v)
        else:  # the transposed (B, H, S, d) views reshape with copies
            k = tp.op(k.numel, k.elem, (k,))
            v = tp.op(v.numel, v.elem, (v,))
        q = tp.op(q.numel, q.elem, (q,))
        elem = q.elem
        rg = q.rg or k.rg or v.rg
        scores = b * nh * s * skv
        att = tp.op(scores, elem, (q, k), save=(q, k) if rg else ())  # bmm
        att = tp.op(scores, elem, (att,))  # + attention_mask
        # torch.max(., finfo.min): saves the sum; its backward (derivatives.yaml maximum: where(self == other,
        # grad / 2, grad).masked_fill_(self < other, 0)) makes the eq and lt masks and grad / 2 beside the gradient
        att = tp.op(scores, elem, (att,), save=(att,) if rg else (), bwd_scratch=scores * (elem + 2) if rg else 0)
        probs = tp.op(scores, elem, (att,))  # softmax in the scores' dtype
        if rg:
            tp.save_output(probs)
        self.probs = probs
        dropped = self.dropout(probs, spec.attention_dropout if self.num.training else 0.0)
        out = tp.op(b * s * qd, elem, (dropped, v), save=(dropped, v) if rg else ())  # bmm
        out = tp.op(out.numel, out.elem, (out,))  # transpose(1, 2).reshape: a copy
        o = lin(out, qd, h, spec.o_name or "out_proj", spec.o_bias)
        return self.dropout(o, spec.hidden_dropout)

    def gpt1_attention(self, n: Tensor) -> Tensor:
        """OpenAI GPT's Attention (modeling_openai.py, transformers 5.24; no cache, no SDPA path): one Conv1D c_attn
        split into head views; ``matmul(q, k)`` copies the strided q and k (what it saves); ``w / sqrt(d)``; ``w * b +
        -1e4 * (1 - b)`` against the causal ``bias`` buffer slice (the three (B, H, S, S) tensors live together: ``w``
        is rebound only after the sum); softmax in the scores' dtype (saves its result); attn_dropout; ``matmul`` with
        a copy of the strided values; merge_heads copies; c_proj; resid_dropout."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, qd = spec.hidden_size, spec.q_dim
        b, s, nh = self.b, self.s, spec.num_heads
        qkv = self.proj(n, h, 3 * qd, spec.qkv_name or "c_attn", spec.qkv_bias)
        q = tp.op(b * s * qd, qkv.elem, (qkv,))  # matmul's contiguous copies of the strided head views
        k = tp.op(b * s * qd, qkv.elem, (qkv,))
        elem = q.elem
        rg = q.rg
        scores = b * nh * s * s
        att = tp.op(scores, elem, (q, k), save=(q, k) if rg else ())
        w1 = tp.op(scores, elem, (att,))  # / sqrt(d)
        w2 = tp.op(scores, elem, (w1,))  # * b (saves the buffer slice only)
        w3 = tp.op(scores, elem, (w2,))  # + -1e4 * (1 - b)
        w1.last_use = len(tp.ops) - 1
        probs = tp.op(scores, elem, (w3,))  # softmax in the scores' dtype
        if rg:
            tp.save_output(probs)
        dropped = self.dropout(probs, spec.attention_dropout)
        v = tp.op(b * s * qd, qkv.elem, (qkv,))
        out = tp.op(b * s * qd, elem, (dropped, v), save=(dropped, v) if rg else ())
        out = tp.op(out.numel, out.elem, (out,))  # merge_heads: permute(...).contiguous()
        o = self.proj(out, qd, h, spec.o_name or "c_proj", spec.o_bias)
        return self.dropout(o, spec.hidden_dropout)

    def shared_kv_attention(self, n: Tensor, lin: Callable[[Tensor, int, int, str, bool], Tensor],
                            kernel: Kernel) -> Tensor:
        """A layer that reuses the keys and values an earlier layer stored (modeling_gemma4.py Gemma4TextAttention
        with kv_sharing_mode "reuse"): q_proj, q_norm and RoPE, attention over the stored (B, Hkv, S, d) keys and
        values, o_proj. Those are held by the model's shared_kv_states (inputs here, alive throughout); their
        gradient, which goes back to the storing layer, is not counted."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, qd, kvd, d = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.head_dim
        elem = max(self.num.act, resid_elem(self.num)) if not self.num.amp else self.num.act
        k = tp.input(self.b * self.kv_len * kvd, elem, held=True)
        v = tp.input(self.b * self.kv_len * kvd, elem, held=True)
        q = lin(n, h, qd, "q_proj", spec.qkv_bias)
        if spec.qk_norm:
            q = self.norm(q, d, plan.trainable)
        q = self.call(self.rope, q)
        if self.num.amp and kernel is not Kernel.EAGER:
            q, k, v = self.cast(q, 2), self.cast(k, 2), self.cast(v, 2)
        heads_kv = spec.num_kv_heads
        has_mask = kernel is not Kernel.FLASH and plan.sliding and window_masked(spec, self.kv_len)
        if sdpa_repeats_kv(spec, has_mask) and heads_kv != spec.num_heads and \
                kernel in (Kernel.FLASH, Kernel.EFFICIENT):
            k = tp.op(self.b * self.kv_len * qd, k.elem, (k,))
            v = tp.op(self.b * self.kv_len * qd, v.elem, (v,))
            heads_kv = spec.num_heads
        out = self.attention_core(q, k, v, kernel, heads_kv, has_mask)
        if kernel in (Kernel.EAGER, Kernel.MATH):
            out = tp.op(out.numel, out.elem, (out,))
        o = lin(out, qd, h, "o_proj", spec.o_bias)
        return self.dropout(o, spec.hidden_dropout)

    def mla(self, n: Tensor) -> Tensor:
        """Multi-head latent attention (modeling_deepseek_v3.py, transformers 5.24): q through its low-rank
        pair, one compressed key/value latent plus a shared rotary key (what the cache stores), expanded to
        every head by kv_b_proj; q/k heads of nope + rope dims, values of v_head_dim."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, nh, qk, rd, vd = spec.hidden_size, spec.num_heads, spec.head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        qr, kvr = spec.q_lora_rank, spec.kv_lora_rank
        b, s, tr = self.b, self.s, plan.trainable
        nope = qk - rd

        lin = self.proj

        qn: Tensor | None = None
        gate: Tensor | None = None
        # HYV4Attention: gate_states = gate_proj(hidden_states), before the query; held through the attention
        out_gate = lin(n, h, nh * vd, "gate_proj", False) if spec.mla_out_gate else None
        if qr and spec.mla_q_gate:  # AXK2Attention: q_gate_proj(cat([q_resid, q_compressed])) -> query, gate
            qa = lin(n, h, qr, "q_a_proj", spec.qkv_bias)
            qn = self.norm(qa, qr, tr)
            qcat = tp.op(b * s * 2 * qr, qa.elem, (qn, qa), passthrough=True)
            qg = lin(qcat, 2 * qr, nh * (qk + vd), "q_gate_proj", False)
            q = tp.view(qg, b * s * nh * qk)
            gate = tp.op(b * s * nh * vd, qg.elem, (qg,), passthrough=True)  # reshape of the strided split: a copy
        elif qr:
            qa = lin(n, h, qr, "q_a_proj", spec.qkv_bias)
            qn = self.norm(qa, qr, tr)
            if spec.mla_latent_scale:  # q_resid * q_lora_scale (the indexer reads the scaled latent too)
                qn = tp.op(qn.numel, qn.elem, (qn,))
            q = lin(qn, qr, nh * qk, "q_b_proj", False)
        else:
            q = lin(n, h, nh * qk, "q_proj", False)
        q_pass: Tensor | None = None
        q_rot_in = tp.view(q, b * s * nh * rd)
        if spec.mla_lora_scale:  # LongcatFlashMLA: q_pass * mla_scale_q_lora, q_rot * mla_scale_q_lora (new tensors)
            q_pass = tp.op(b * s * nh * nope, q.elem, (q,))
            q_rot_in = tp.op(b * s * nh * rd, q.elem, (q,))
        ckv = lin(n, h, kvr + rd, "kv_a_proj_with_mqa", spec.qkv_bias)
        if spec.mla_latent_scale:  # kv_a_layernorm(kv_pass.contiguous()) * kv_lora_scale
            latent = tp.op(b * s * kvr, ckv.elem, (ckv,), passthrough=True)
            latent = self.norm(latent, kvr, tr)
            latent = tp.op(latent.numel, latent.elem, (latent,))
        else:
            latent = self.norm(tp.view(ckv, b * s * kvr), kvr, tr)
            if spec.mla_lora_scale:  # k_pass * mla_scale_kv_lora: the normed latent rebound to the product
                latent = tp.op(latent.numel, latent.elem, (latent,))
        # apply_rotary_pos_emb_interleave: cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin]) on the rotary slices
        # (KimiLinearAttention applies no rotary embedding: the query is q_states itself, the rotary key a view)
        rotary = spec.position is PositionKind.ROPE
        rot = self.rope_complex if spec.rope_style == "complex" else self.rope
        q_rot = self.call(rot, q_rot_in)
        k_in = tp.view(ckv, b * s * rd)
        if spec.mla_latent_scale:  # k_rope_only_layernorm before the rotary embedding
            k_in = self.norm(k_in, rd, tr)
        k_rot = self.call(rot, k_in)
        if not self.num.training:  # the cache holds the latent and the rotary key (torch.cat copies)
            latent = tp.op(b * self.kv_len * kvr, latent.elem, (latent,), kind=KV)
            k_rot = tp.op(b * self.kv_len * rd, k_rot.elem, (k_rot,), kind=KV)
            tp.keep(latent, k_rot)
        query = tp.op(b * s * nh * qk, q.elem, (q_pass if q_pass is not None else q, q_rot)) if rotary else q
        # (torch.cat((q_pass, q_rot)))
        kvb = lin(latent, kvr, nh * (nope + vd), "kv_b_proj", False)
        key = tp.op(b * self.kv_len * nh * qk, kvb.elem, (kvb, k_rot))  # new_empty + copy_ of k_nope and k_rot
        value = tp.view(kvb, b * self.kv_len * nh * vd)
        # DeepSeek Sparse Attention: the indexer's top-k selection folded into the attention mask
        sparse = self.dsa_mask(n, qn if qn is not None else n) if spec.index_heads else \
            self.dsa_index_mask() if spec.index_shared else None
        # a sliding layer's SDPA gets the sliding-window boolean mask (Dots 3's sliding MLA layers)
        window = bool(plan.sliding and window_masked(spec, self.kv_len)) and sparse is None
        kernel = self.kernel_for(sparse is not None or window)
        if kernel is Kernel.FLASH:  # q/k and v head sizes differ: the fused kernel is out, the efficient one runs
            kernel = Kernel.EFFICIENT
        if kernel is Kernel.EFFICIENT:
            rg = query.rg or key.rg or value.rg
            lse = tp.op(b * nh * (-(-s // 32) * 32), 4, (), rg=False)
            ins: tuple[Tensor, ...] = (query, key, value, lse)
            if sparse is not None:
                # SDPA turns the boolean mask into an additive one in the query dtype (convert_boolean_attn_mask:
                # zeros, masked_fill of its logical_not), which the efficient kernel keeps for backward
                ins += (tp.op(sparse.numel, query.elem, (sparse,), rg=False, fwd_scratch=sparse.numel),)
            elif window and s > 1:  # the model's (batch, 1, seq, kv) sliding-window mask (see sdpa_bias)
                ins += (self.sdpa_bias(query.elem),)
            out = tp.op(b * s * nh * vd, query.elem, ins, save=ins if rg else (), grad_to=(query, key, value))
            if rg:
                tp.save_output(out)
                tp.ops[-1].bwd_scratch = b * s * nh * qk * 4  # the kernel's fp32 dq accumulator
        else:
            out = self.attention_core(query, key, value, kernel, nh, masked=window)
            out = tp.op(b * s * nh * vd, out.elem, (out,))  # transpose(1, 2).contiguous() copies
        if gate is not None:  # (attn_output * torch.sigmoid(gate_states.float())).to(attn_output.dtype)
            out = self.cast(self.mul(out, self.ew(self.cast(gate, 4), save_out=True)), out.elem)
            tp.hold(gate)
        if spec.mla_head_gate == "fp32":  # BailingHybridAttention: out * sigmoid(g_proj(x).float()).to(dtype)
            gs = self.cast(self.ew(self.cast(lin(n, h, nh, "g_proj", False), 4), save_out=True), out.elem)
            out = self.mul(out, gs)
        elif spec.mla_head_gate:  # Dots3NoteTextAttention: attn_output * g_proj(x).view(..., 1).sigmoid()
            out = self.mul(out, self.ew(lin(n, h, nh, "g_proj", False), save_out=True))
        if out_gate is not None:  # attn_output * torch.sigmoid(gate_states), in the activations' dtype
            out = self.mul(out, self.ew(out_gate, save_out=True))
        o = lin(out, nh * vd, h, "o_proj", spec.o_bias)
        # the forward's locals (q_states, q_rot, query/key/value states, the latent) live until it returns
        for x in (q, q_rot, query, key, kvb, latent, k_rot) + ((sparse,) if sparse is not None else ()) + \
                ((q_pass,) if q_pass is not None else ()):
            root = x.base if x.base is not None else x
            root.last_use = max(root.last_use, len(tp.ops) - 1)
        return self.dropout(o, spec.hidden_dropout)

    def mlp(self, n: Tensor) -> Tensor:
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h = spec.hidden_size
        tr = plan.trainable

        lin = self.proj

        if plan.moe and not spec.moe_beside_mlp:
            return self.moe_dense(n) if spec.moe_dense_dispatch else self.moe(n)
        i = spec.intermediate_size
        if spec.mlp is MLPKind.GATED:
            if spec.gate_up_fused:
                gu = lin(n, h, 2 * i, "gate_up_proj", spec.mlp_bias)
                g, u = tp.split(gu, 2)  # gate_up_proj(x).chunk(2, dim=-1)
            elif spec.altup_inputs:  # Gemma3nTextMLP: gate_proj, its Gaussian top-k, the activation, then up_proj
                from .gemma3n import gaussian_topk

                g = lin(n, h, i, "gate_proj", spec.mlp_bias)
                if spec.act_sparsity:
                    g = gaussian_topk(self, g)
                a = self.activation(g)
                u = lin(n, h, i, "up_proj", spec.mlp_bias)
                held_gate = g  # ``gate_proj`` stays bound until the MLP returns
            elif spec.mlp_multipliers:  # FalconH1MLP: up_proj(x) * act_fn(gate_proj(x) * gate_multiplier)
                u = lin(n, h, i, "up_proj", spec.mlp_bias)
                g = lin(n, h, i, "gate_proj", spec.mlp_bias)
                g = tp.op(g.numel, g.elem, (g,))
            elif spec.mlp_glu_fp32:  # BeamMLP: gate = gate_proj(x); up = up_proj(x), then the fp32 product
                g = lin(n, h, i, "gate_proj", spec.mlp_bias)
                u = lin(n, h, i, "up_proj", spec.mlp_bias)
            else:
                # act_fn(gate_proj(x)) * up_proj(x) (LlamaMLP and its ~140 copies, transformers 5.24): Python
                # evaluates the left factor first, so the gate dies into its activation before up_proj runs
                g = lin(n, h, i, "gate_proj", spec.mlp_bias)
                a = self.activation(g)
                u = lin(n, h, i, "up_proj", spec.mlp_bias)
            if spec.mlp_glu_fp32:  # BeamMLP: (act_fn(gate.float()) * up.float()).to(gate.dtype)
                p = self.cast(self.mul(self.activation(self.cast(g, 4)), self.cast(u, 4)), g.elem)
                out = lin(p, i, h, "down_proj", spec.mlp_bias)
                tp.hold(g, u)  # gate and up: the forward's locals
                return self.dropout(out, spec.hidden_dropout)
            if spec.mlp_multipliers or spec.gate_up_fused:
                a = self.activation(g)
            p = self.mul(u, a) if spec.mlp_multipliers else self.mul(a, u)
            if spec.sub_norms:  # modeling_bitnet.py: ffn_sub_norm(act(gate) * up) before down_proj: the product
                # is the norm's argument, referenced until it returns
                p = self.call(lambda v: self.norm(v, i, tr), p)
            out = lin(p, i, h, "down_proj", spec.mlp_bias)
            if spec.gate_up_fused:
                # ``gate, up_states = up_states.chunk(2, dim=-1)`` (Phi3MLP, GlmMLP and their copies): the local
                # ``gate`` is a view of the fused output and stays bound until the MLP returns, through down_proj
                tp.hold(gu)
            if spec.altup_inputs:
                tp.hold(held_gate, a, u)
            if spec.mlp_multipliers:  # down_proj(y) * down_multiplier
                out = tp.op(out.numel, out.elem, (out,))
        else:
            names = spec.mlp_names or {"gpt2": ("c_fc", "c_proj"), "gptj": ("fc_in", "fc_out"), "opt": ("fc1", "fc2"),
                                       "nemotron_h": ("up_proj", "down_proj")}.get(spec.family,
                                                                                 ("dense_h_to_4h", "dense_4h_to_h"))
            f = lin(n, h, i, names[0], spec.mlp_bias)
            # act_fn(fc1(x)): the projection is the activation's argument, referenced until it returns (a
            # multi-op Python activation such as NewGELUActivation keeps it beside its temporaries)
            a = self.call(self.activation, f)
            out = lin(a, i, h, names[1], spec.mlp_bias)
        return self.dropout(out, spec.hidden_dropout)

    def activation(self, x: Tensor) -> Tensor:
        act = self.spec.activation
        n = x.numel
        tp = self.tp
        if act is Activation.GELU_NEW:
            # transformers NewGELUActivation: 0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))).
            # Under autocast, pow runs in fp32 (autocast's fp32 op list), and type promotion keeps
            # the chain in fp32 from there on.
            # Python evaluates the left factor ``0.5 * x`` first: it lives through the whole tanh chain.
            t7 = tp.op(n, x.elem, (x,))
            xp = self.cast(x, 4) if self.num.amp else x
            t1 = tp.op(n, xp.elem, (xp,), save=(xp,) if xp.rg else ())
            t2 = tp.op(n, t1.elem, (t1,))
            t3 = self.add(x, t2)
            t4 = tp.op(n, t3.elem, (t3,))
            t5 = self.ew(t4, save_out=True)
            t6 = tp.op(n, t5.elem, (t5,))
            return self.mul(t7, t6)
        if act is Activation.RELU2:  # relu saves its result; square saves its input (that same result)
            r = tp.op(n, x.elem, (x,))
            if x.rg:
                tp.save_output(r)
            # square is pow(r, 2): pow_backward (FunctionsManual.cpp) makes r.pow(1) and 2 * that before the product
            # that is the input's gradient
            out = tp.op(n, x.elem, (r,), save=(r,) if r.rg else (), bwd_scratch=2 * n * x.elem if r.rg else 0)
            # ReLUSquaredActivation.forward (activations.py) is two ops in Python: its argument, the up
            # projection, stays referenced by the caller until it returns, so input, relu and square coexist
            root = x.base if x.base is not None else x
            root.last_use = max(root.last_use, len(tp.ops) - 1)
            return out
        if act is Activation.XIELU:
            # XIELUActivation._xielu_python (activations.py): where(x > 0, alpha_p * x * x + beta * x,
            # (expm1(min(x, eps)) - x) * alpha_n + beta * x); saved: alpha_p * x and x (the square), expm1's result,
            # the bool condition, and where the alphas train, x and expm1(...) - x for their gradients
            e = x.elem
            tr = self.plan is not None and self.plan.trainable
            pg = self.param_grad(f"xielu{len(tp.ops)}", 2, self.num.param) if tr else ()
            cond = tp.op(n, 1, (x,), rg=False)
            t2 = tp.op(n, e, (x,), save=(x,) if tr else (), params=pg, rg=x.rg or tr)  # x for alpha_p's gradient
            t3 = tp.op(n, e, (t2, x), save=(t2, x) if t2.rg else ())
            t4 = tp.op(n, e, (x,))  # beta * x (beta a buffer)
            t5 = self.add(t3, t4)
            t6 = tp.op(n, e, (x,), save=(x,) if x.rg else ())  # min(x, eps)
            t7 = tp.op(n, e, (t6,))  # expm1 saves its result
            if t7.rg:
                tp.save_output(t7)
            t8 = tp.op(n, e, (t7, x))
            t9 = tp.op(n, e, (t8,), save=(t8,) if tr else (), rg=t8.rg or tr)  # (t8 for alpha_n's gradient)
            t10 = tp.op(n, e, (x,))
            t11 = self.add(t9, t10)
            return tp.op(n, e, (cond, t5, t11), save=(cond,) if t5.rg or t11.rg else (), grad_to=(t5, t11))
        if act is Activation.RELU:  # threshold_backward reads the result, shared with the next linear
            out = tp.op(n, x.elem, (x,))
            if x.rg:
                tp.save_output(out)
            return out
        return tp.op(n, x.elem, (x,), save=(x,) if x.rg else ())

    def router(self, n: Tensor, t: int, e: int, k: int, tr: bool) -> tuple[Tensor, Tensor]:
        """Top-k routing: (expert indices, routing weights) of every token.

        softmax routers (Mixtral, Qwen, Granite): logits, ``softmax(dtype=float32)`` (saves its result),
        ``topk`` (saves the indices). fp32 routers (DeepSeek-V3, GLM-4.5, ERNIE 4.5) first copy the hidden
        states to fp32 and keep an fp32 weight; sigmoid routers add the score-correction bias and mask the
        groups not chosen before the top-k, then gather the weights from the scores.
        """
        spec, tp = self.spec, self.tp
        h = spec.hidden_size
        pairs = t * k
        x = self.cast(n, 4) if spec.router_fp32 else n
        if spec.router_jitter and self.num.training:
            # DbrxRouter: hidden_states *= torch.empty_like(hidden_states).uniform_(1 - eps, 1 + eps): the noise is
            # saved by the in-place product (its gradient to the hidden states)
            noise = tp.op(n.numel, n.elem, (), rg=False)
            x = tp.op(n.numel, n.elem, (n, noise), save=(noise,) if n.rg else (), grad_to=(n,))
            x.nbytes = 0  # the product is written into the hidden states' storage
        plan = self.plan
        if plan is not None and "router" in plan.lora_targets:  # peft ParamWrapper on the router's gate.weight
            wr = self.wrapped_param(h, e, "router", plan.lora_rank, 1, 4 if spec.router_fp32 else self.num.param)
            logits = tp.op(t * e, x.elem, (x, wr), save=((x,) if wr.rg else ()) + ((wr,) if x.rg else ()),
                           grad_to=(x, wr))
            wr.last_use = len(tp.ops) - 1
        else:
            logits = self.linear(x, h, e, "router", bias=spec.router_bias, trainable=tr,
                                 weight_elem=4 if spec.router_fp32 else None)
        if spec.router_topk_first:  # GptOssTopKRouter: topk(logits) (saves the indices), softmax over the k values
            idx = tp.op(pairs, 8, (logits,), rg=False)
            top = tp.op(pairs, logits.elem, (logits, idx), save=(idx,) if logits.rg else (), grad_to=(logits,))
            w = tp.op(pairs, logits.elem, (top,))
            if w.rg:
                tp.save_output(w)
            return idx, w
        # softmax(dtype=float32); a sigmoid of 16-bit logits stays 16-bit (Lfm2MoeTopKRouter: logits.sigmoid()), and so
        # does DBRX's softmax(dtype=router_logits.dtype); a sigmoid router whose weights reach the experts in fp32
        # scores an fp32 copy of its logits (MiniMaxM2TopKRouter: sigmoid(router_logits.float()))
        pe = logits.elem if (spec.router_sigmoid and not spec.router_fp32 and not spec.router_weights_fp32) or \
            spec.router_softmax_native else 4
        if pe == 4 and logits.elem != 4 and spec.router_sigmoid:
            logits = self.cast(logits, 4)
        probs = tp.op(t * e, pe, (logits,))
        if probs.rg:
            tp.save_output(probs)
        if spec.router_sigmoid and not spec.router_sigmoid_plain:
            choice = tp.op(t * e, 4, (probs,), rg=False)  # scores + e_score_correction_bias
            masked = tp.op(t * e, 4, (choice,), rg=False)  # masked_fill of the groups not chosen
            idx = tp.op(pairs, 8, (masked,), rg=False)
        else:
            idx = tp.op(pairs, 8, (probs,), rg=False)
        w = tp.op(pairs, pe, (probs, idx), save=(idx,) if probs.rg else (), grad_to=(probs,))
        # fp32 sigmoid routers and Mixtral's return fp32 weights (the weighted expert outputs are then fp32 until the
        # final cast)
        return idx, w if (spec.router_sigmoid and spec.router_fp32) or spec.router_weights_fp32 else \
            self.cast(w, n.elem)

    def moe(self, n: Tensor, routed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Sparse MoE block as transformers 5.24 runs it by default (``experts_implementation="grouped_mm"``,
        integrations/moe.py ``grouped_mm_experts_forward``): the router's fp32 softmax and top-k, every
        (token, expert) pair sorted by expert and gathered into one (T*k, hidden) batch, two grouped GEMMs,
        the routing weights applied, the pairs put back in token order and summed over k."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, i, e, k = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.experts_per_token
        t = n.numel // h
        hidden = h
        self._wrapped.clear()
        pairs = t * k
        tr = plan.trainable
        act = n.elem
        # Qwen2-MoE and ERNIE 4.5 run the shared expert before the router (its output is held through the routed
        # experts); DeepSeek-V3, GLM-4.5 and Granite after them
        shared = self.shared_expert(n) if spec.shared_expert_intermediate_size and spec.shared_expert_first else None
        idx, w = routed if routed is not None else self.router(n, t, e, k, tr)
        routed_in = n
        if spec.moe_latent_size:  # NemotronHMoE: fc1_latent_proj after the router, the experts at the latent width
            h = spec.moe_latent_size
            routed_in = self.proj(n, hidden, h, "fc1_latent_proj", spec.mlp_bias)
        if spec.moe_experts_loop:
            return self.experts_loop(n, idx, w)
        # sort the (token, expert) pairs by expert; gather hidden states and weights in that order
        eid = tp.op(pairs, 8, (idx,), rg=False)
        perm = tp.op(pairs, 8, (idx,), rg=False)
        tok = tp.op(pairs, 8, (perm,), rg=False)  # perm // top_k
        xin = tp.op(pairs * h, act, (routed_in, tok), save=(tok,) if routed_in.rg else (), grad_to=(routed_in,))
        wg = tp.op(pairs, w.elem, (w, perm), save=(perm,) if w.rg else (), grad_to=(w,))
        hist = tp.op(pairs, 4, (eid,), rg=False)  # histc input (an int32 copy on CUDA), then counts and offsets
        offs = tp.op(2 * e, 4, (hist,), rg=False)
        bias_g: Tensor | None = None
        if spec.expert_bias:  # gate_up_proj_bias[expert_ids_g], added in place to the grouped GEMM's output
            bias_g = tp.op(pairs * 2 * i, act, (), rg=False)
        if spec.expert_glu == "none":  # has_gate=False: act_fn(up_proj) (grouped_mm_experts_forward)
            up = self.experts_proj(xin, h, i, "experts.up_proj")
            p = self.activation(up)
        else:
            gu = self.experts_proj(xin, h, 2 * i, "experts.gate_up_proj", fused=2)
            if spec.expert_glu == "clamped":
                p = self.clamped_glu(gu, pairs * i)
            elif spec.expert_glu == "clamped_silu":  # HYV4Experts._apply_gate: chunk(2), gate.clamp(max=limit),
                # up.clamp(-limit, limit) (clamp saves its input), silu(gate) * up
                gate, up = tp.split(gu, 2)
                gc = tp.op(gate.numel, gate.elem, (gate,), save=(gate,) if gate.rg else ())
                uc = tp.op(up.numel, up.elem, (up,), save=(up,) if up.rg else ())
                p = self.mul(self.activation(gc), uc)
            elif spec.expert_glu == "fp32":  # modeling_beam.py: (act(gate.float()) * up.float()).to(gate.dtype)
                gate, up = tp.split(gu, 2)
                p = self.cast(self.mul(self.activation(self.cast(gate, 4)), self.cast(up, 4)), act)
            elif spec.expert_glu == "softcap_fp32":
                # Inkling2SoftcappedSwiGLU: gate, up = .float(); tanh(gate / c) * c * sigmoid(gate) * (tanh(up / c') *
                # c'); cast back (tanh and sigmoid save their results, the products their operands)
                gate, up = tp.split(gu, 2)
                g32, u32 = self.cast(gate, 4), self.cast(up, 4)
                gc = tp.op(g32.numel, 4, (self.ew(tp.op(g32.numel, 4, (g32,)), save_out=True),))
                sg = self.ew(g32, save_out=True)
                uc = tp.op(u32.numel, 4, (self.ew(tp.op(u32.numel, 4, (u32,)), save_out=True),))
                p = self.cast(self.mul(self.mul(gc, sg), uc), act)
            else:
                gate, up = tp.split(gu, 2)  # _default_apply_gate: gate_up_out.chunk(2, dim=-1)
                a = self.activation(gate)
                p = self.mul(a, up)
        if bias_g is not None:  # rebound to down_proj_bias[expert_ids_g]
            first, bias_g = bias_g, tp.op(pairs * h, act, (), rg=False)
            first.last_use = len(tp.ops) - 1
        dn = self.experts_proj(p, i, h, "experts.down_proj")
        wd = self.mul(dn, wg)
        inv = tp.op(pairs, 8, (perm,), rg=False)  # inv_perm[perm] = arange(...)
        back = tp.op(pairs * h, wd.elem, (wd, inv), save=(inv,) if wd.rg else (), grad_to=(wd,))
        out = tp.op(t * h, wd.elem, (back,))  # .view(T, k, h).sum(dim=1)
        # the function's locals (the gathered states, sort results, offsets, the down projection's output)
        # stay referenced until it returns
        # (and peft's parametrized expert weights: cached until the wrapped experts module returns)
        for x in (xin, eid, perm, tok, wg, hist, offs, dn, inv) + ((bias_g,) if bias_g is not None else ()) + \
                tuple(self._wrapped):
            x.last_use = max(x.last_use, len(tp.ops) - 1)
        out = self.cast(out, act)  # final_hidden_states.to(hidden_states.dtype)
        if spec.moe_output_scale:  # hidden_states * routed_scaling_factor (modeling_laguna.py, modeling_beam.py)
            out = tp.op(t * h, act, (out,))
        if spec.moe_latent_size:  # fc2_latent_proj back to the hidden width
            out = self.proj(out, h, hidden, "fc2_latent_proj", spec.mlp_bias)
        if spec.shared_expert_intermediate_size:
            so = shared if shared is not None else self.shared_expert(n)
            if spec.shared_expert_gate:  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
                gate = self.linear(n, h, 1, "shared_expert_gate", bias=False, trainable=tr,
                                   lora_rank=plan.lora_rank if "shared_expert_gate" in plan.lora_targets else 0)
                gs = self.ew(gate, save_out=True)
                so = self.mul(so, gs)
            if spec.moe_fp32_combine:  # modeling_hy_v3.py: (routed_output.float() + shared.float()).to(dtype)
                out = self.cast(self.add(self.cast(out, 4), self.cast(so, 4)), act)
            else:
                out = self.add(out, so)
        if spec.moe_post_norm:  # AXK1MoE: return self.post_mlp_layernorm(hidden_states)
            out = self.norm(out, hidden, tr)
        return out

    def experts_loop(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """DbrxExperts.forward (modeling_dbrx.py, transformers 5.24): ``zeros_like`` output; ``one_hot(top_k_index,
        experts + 1)`` (int64); for each expert hit — every expert, under the balanced routing the trace assumes, each
        with tokens x top-k / experts tokens — ``where`` of its mask (positions and token indices), the gathered
        tokens ``hidden_states[token_idx]``, ``x @ w1[e].T`` and ``x @ v1[e].T``, ``act(gate) * up``, ``@ w2[e]``,
        times the gathered routing weights, ``index_add_`` into the output. The expert's weights are slices of the
        stacked parameters: each slice's gradient is scattered into a zero-filled stack-sized buffer
        (select_backward) before it is accumulated into the stack's gradient."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, i, e, k = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.experts_per_token
        t = x.numel // h
        te = -(-t * k // e)
        act, tr = x.elem, plan.trainable
        out = tp.op(t * h, act, (), rg=False)  # zeros_like(hidden_states)
        mask = tp.op(t * k * (e + 1), 8, (idx,), rg=False)  # one_hot, permuted (a view), summed and nonzero'd
        welem = self.num.param

        def mm(v: Tensor, fin: int, fout: int, name: str) -> Tensor:
            y = self.linear(v, fin, fout, name, bias=False, trainable=tr, quant=plan.quant)
            if tr and self.num.training:  # the slice's gradient: a stack-sized zero-filled buffer, then accumulated
                tp.ops[-1].params = self.param_grad(name, fin * fout * e, welem)
                tp.ops[-1].bwd_scratch += fin * fout * e * welem
            return y

        written: list[Tensor] = []
        for _ in range(e):
            tok = tp.op(te, 8, (mask,), rg=False)  # torch.where(expert_mask[expert_idx]): token indices
            pos = tp.op(te, 8, (mask,), rg=False)  # and top-k positions
            xg = tp.op(te * h, act, (x, tok), save=(tok,) if x.rg else (), grad_to=(x,))
            g = mm(xg, h, i, "experts.w1")
            u = mm(xg, h, i, "experts.v1")
            p = self.mul(self.activation(g), u)
            d = mm(p, i, h, "experts.w2")
            wg = tp.op(te, w.elem, (w, tok, pos), save=(tok, pos) if w.rg else (), grad_to=(w,))
            st = self.mul(d, wg)
            acc = tp.op(te * h, act, (st, tok), save=(tok,) if st.rg else (), grad_to=(st,))
            acc.nbytes = 0  # next_states.index_add_(0, token_idx, states): written into the output's storage
            written.append(acc)
        out.last_use = len(tp.ops) - 1
        # the output (the zeros' storage, written by every expert) carries the gradient to each expert's slice
        res = tp.op(t * h, act, tuple(written), grad_to=tuple(written))
        tp.hold(mask)
        return res

    def moe_dense(self, n: Tensor) -> Tensor:
        """Llama4TextMoe (modeling_llama4.py, transformers 5.24): every expert runs every token. Llama4Router (an
        nn.Linear): logits, ``topk`` (values and indices), ``full_like(logits, -inf).scatter_(indices, values)``,
        ``sigmoid(scores.float()).to(dtype)``; ``hidden.repeat(experts, 1) * scores.transpose(0, 1).reshape(-1, 1)``
        (the transposed scores copied); Llama4TextExperts: ``bmm`` with gate_up_proj (experts, hidden, 2 x width),
        chunk, ``up * act(gate)``, ``bmm`` with down_proj; then the shared expert on the hidden states and the
        experts' outputs summed over the experts, added in place to it."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, i, e, k = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.experts_per_token
        t = n.numel // h
        tr = plan.trainable
        act = n.elem
        logits = self.linear(n, h, e, "router", bias=False, trainable=tr)
        idx = tp.op(t * k, 8, (logits,), rg=False)
        top = tp.op(t * k, logits.elem, (logits, idx), save=(idx,) if logits.rg else (), grad_to=(logits,))
        full = tp.op(t * e, logits.elem, (), rg=False)  # full_like(-inf); scatter_ writes the top-k values into it
        scores = tp.op(t * e, logits.elem, (full, top, idx), save=(idx,) if top.rg else (), grad_to=(top,))
        full.last_use = len(tp.ops) - 1
        sg = self.ew(self.cast(scores, 4), save_out=True)  # sigmoid saves its result
        w = self.cast(sg, act)
        rep = tp.op(e * t * h, act, (n,))  # hidden_states.repeat(experts, 1)
        col = tp.op(e * t, act, (w,))  # router_scores.transpose(0, 1).reshape(-1, 1): a copy
        routed_in = self.mul(rep, col)
        gu = self.linear(routed_in, h, 2 * i, "experts.gate_up_proj", bias=False, trainable=tr, quant=plan.quant,
                         count=e)
        gate, up = tp.split(gu, 2)  # gate_up.chunk(2, dim=-1)
        a = self.activation(gate)
        p = self.mul(up, a)
        dn = self.linear(p, i, h, "experts.down_proj", bias=False, trainable=tr, quant=plan.quant, count=e)
        # the block's routed_in and the experts' gate_up (gate and up are views of it) stay referenced until the
        # experts return
        tp.hold(routed_in, gu)
        so = self.shared_expert(n)
        summed = tp.op(t * h, act, (dn,))  # .reshape(experts, tokens, hidden).sum(dim=0)
        return self.add(so, summed)  # out.add_(...)

    def experts_proj(self, x: Tensor, fin: int, fout: int, name: str, fused: int = 1) -> Tensor:
        """One grouped GEMM over the stacked expert weights ``name`` (experts x fout x fin), frozen, trained or
        adapted by peft as the plan says. bitsandbytes leaves the stack unquantized (it replaces nn.Linear
        modules only) and QLoRA's prepare_model_for_kbit_training then holds it in fp32. ``fused``: how many v4
        projections the stack fuses (peft doubles the adapter's rank for gate_up_proj)."""
        spec, plan = self.spec, self.plan
        assert plan is not None
        e = spec.num_experts
        bnb = plan.quant.bitsandbytes
        quant = WeightsQuant.NONE if bnb else plan.quant
        welem = self.num.norm_param if bnb else None
        tp = self.tp
        tokens = x.numel // fin
        wdt = welem or self.num.param
        if name in plan.lora_targets:
            w = self.wrapped_param(fin, fout, name, plan.lora_rank * fused, e, wdt)
            self._wrapped.append(w)
        elif quant is not WeightsQuant.NONE or (not self.num.amp and x.elem == wdt):
            return self.linear(x, fin, fout, name, bias=spec.expert_bias, trainable=plan.trainable, quant=quant,
                               count=e, weight_elem=welem)
        else:
            w = None
        # torch._grouped_mm is not autocast-enabled: transformers casts the input to the weights' dtype
        # (integrations/moe.py _grouped_mm), so under AMP (or with QLoRA's fp32 stacks) the GEMM runs in the
        # stack's dtype, without the 16-bit weight copy autocast makes for nn.Linear
        xc = self.cast(x, wdt)
        if w is None:
            tr = plan.trainable
            pg = self.param_grad(name, (fin * fout + (fout if spec.expert_bias else 0)) * e, wdt) if tr else ()
            y = tp.op(tokens * fout, wdt, (xc,), save=(xc,) if tr else (), params=pg)
            if xc.rg:
                tp.ops[-1].packs_weight = True
            return y
        save = ((xc,) if w.rg else ()) + ((w,) if xc.rg else ())
        return tp.op(tokens * fout, wdt, (xc, w), save=save, grad_to=(xc, w))

    def wrapped_param(self, fin: int, fout: int, name: str, r: int, count: int, welem: int) -> Tensor:
        """A parameter adapted by peft's ``lora.ParamWrapper`` (tuners/lora/layer.py, peft 0.21.2): while the
        wrapped module runs, torch.nn.utils.parametrize replaces it (cached for the call) by a new tensor the size
        of the whole parameter: ``baddbmm(W, lhs, rhs, alpha=scaling)`` over a stack of experts
        (``_LoraFactorsProxy``, the fp32 adapters first cast to W's dtype), ``W + (B @ A * scaling).to(W.dtype)``
        for a single matrix (``_LoraParameterProxy``). Its gradient reaches the adapters through that op."""
        tp, lr = self.tp, self.num.lora_param
        ga = self.param_grad(name + ".A", count * r * fin, lr)
        gb = self.param_grad(name + ".B", count * r * fout, lr)
        if count > 1:
            if lr != welem:
                lhs = tp.op(count * fout * r, welem, (), params=gb)  # (experts, out, r) in W's dtype
                rhs = tp.op(count * r * fin, welem, (), params=ga)
                out = tp.op(count * fin * fout, welem, (lhs, rhs), save=(lhs, rhs), kind=WEIGHTS)
            else:  # baddbmm saves the two factors: views of the adapters themselves
                out = tp.op(count * fin * fout, welem, (), params=ga + gb, kind=WEIGHTS)
        else:
            d = tp.op(fin * fout, lr, (), params=ga + gb)  # B @ A (saves the adapters)
            d = tp.op(fin * fout, lr, (d,))  # * scaling
            d = self.cast(d, welem)
            out = tp.op(fin * fout, welem, (d,), kind=WEIGHTS)  # W + delta
        return out

    def clamped_glu(self, gu: Tensor, numel: int) -> Tensor:
        """gpt-oss GptOssExperts._apply_gate: ``gate_up[..., ::2]`` and ``[..., 1::2]`` (strided slices), gate clamped
        above and up on both sides (clamp saves its input), ``glu = gate * sigmoid(gate * alpha)``,
        ``(up + 1) * glu``. MiniMax M3 (modeling_minimax_m3_vl.py MiniMaxM3VLExperts._apply_gate) takes the halves of
        ``gate_up.chunk(2, dim=-1)`` instead: views as well, the same ops after them."""
        tp = self.tp
        gate, up = tp.view(gu, numel), tp.view(gu, numel)
        gc = tp.op(numel, gu.elem, (gate,), save=(gate,) if gate.rg else ())
        uc = tp.op(numel, gu.elem, (up,), save=(up,) if up.rg else ())
        sg = self.ew(tp.op(numel, gu.elem, (gc,)), save_out=True)  # sigmoid(gate * alpha)
        glu = self.mul(gc, sg)
        u1 = tp.op(numel, gu.elem, (uc,))  # up + 1
        return self.mul(u1, glu)

    def shared_expert(self, n: Tensor) -> Tensor:
        """The always-on shared expert: a gated MLP of ``shared_expert_intermediate_size``."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, si = spec.hidden_size, spec.shared_expert_intermediate_size

        def shared(x: Tensor, fin: int, fout: int, name: str) -> Tensor:
            return self.proj(x, fin, fout, name, spec.shared_expert_bias)

        if spec.expert_glu == "none":  # NemotronHMLP: down_proj(act_fn(up_proj(x)))
            su = shared(n, h, si, "shared_up_proj")
            return shared(self.call(self.activation, su), si, h, "shared_down_proj")
        if spec.shared_expert_glu == "clamped":  # MiniMaxM3VLDenseMLP: gate_up_proj, chunk(2), clamped GLU
            sgu = shared(n, h, 2 * si, "shared_gate_up_proj")
            return shared(self.clamped_glu(sgu, sgu.numel // 2), si, h, "shared_down_proj")
        if spec.gate_up_fused:  # GraniteMoeHybridMLP: input_linear, chunk(2)
            sgu = shared(n, h, 2 * si, "shared_gate_up_proj")
            sg, su = tp.split(sgu, 2)
        else:
            sg = shared(n, h, si, "shared_gate_proj")
            su = shared(n, h, si, "shared_up_proj")
        sa = self.activation(sg)
        sp = self.mul(sa, su)
        return shared(sp, si, h, "shared_down_proj")

    def _repeat_kv(self, x: Tensor, numel: int, heads_kv: int) -> Tensor:
        """transformers' ``repeat_kv`` (integrations/sdpa_attention.py): ``x[:, :, None].expand(b, kv, n_rep, s, d)
        .reshape(b, kv * n_rep, s, d)`` copies, except for a single key/value head, whose size-1 head dimension merges
        with the stride-0 repeat into a view (``computeStride``); SDPA's fused kernels take it as is."""
        if heads_kv == 1:
            return self.tp.view(x, numel)
        return self.tp.op(numel, x.elem, (x,))

    def _keeps_input(self, x: Tensor, out: Tensor) -> Tensor:
        """Gemma's RMSNorms (modeling_gemma3.py / modeling_gemma4.py ``forward(self, x)``: ``self._norm(x.float())``
        ... ``.type_as(x)``) keep their 16-bit input bound to the parameter until they return, where LlamaRMSNorm
        rebinds it to the fp32 copy: the input lives through the fp32 products (a q_norm over Gemma 4's 512-wide
        global heads is the prefill peak of Gemma-4-31B)."""
        if self.spec.norm_input_held:
            # Gemma 1-4 (hfconfig: the gemma facts). Held, the program's allocations and frees are the trace's, norm
            # by norm; Gemma-3-1B's reserved memory then follows the trace's only with its RoPE tables unbatched and
            # its single key/value head repeated as a view (rope_tables_unbatched, _repeat_kv)
            self.tp.hold(x)
        return out

    def bound_until_now(self, *tensors: Tensor) -> None:
        """Python locals that outlive their last use (freed when the function returns or the name is rebound), up to
        the op recorded last: applied to inference. In training they stay off: with the backward following autograd's
        gradient buffers (replay.backward) they move Llama-3.2-3B batch 2 x 3072 by 0.04% against the trace, but the
        H200 rows' reserved median from 0.20% to 0.24% (calibration) and 0.19% to 0.24% (grid), Llama-3.2-1B fp32
        training +0.0% -> +3.5% (one 1 GiB segment), so the training stream keeps the forward its backward was
        checked with."""
        if not self.num.training:
            self.tp.hold(*tensors)

    def call(self, module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``module(x)``: the caller's ``hidden_states`` keeps ``x`` referenced until the module returns."""
        y = module(x)
        root = x.base if x.base is not None else x
        root.last_use = max(root.last_use, len(self.tp.ops) - 1)
        return y

    def residual(self, x: Tensor) -> Tensor:
        """Granite's ``hidden_states * residual_multiplier`` before the residual add (a new tensor)."""
        return self.tp.op(x.numel, x.elem, (x,)) if self.spec.residual_scale else x

    def residual_add(self, x: Tensor, a: Tensor) -> Tensor:
        """The residual stream ``x`` plus a sublayer's output ``a``; Beam's depth-scaled add
        (``hidden_states * scale + residual * residual_scale``): each product a new tensor (python-float scales: their
        backward saves nothing), then the sum."""
        if self.spec.residual_depth_scale:
            sa = self.tp.op(a.numel, a.elem, (a,))
            sx = self.tp.op(x.numel, x.elem, (x,))
            return self.add(sa, sx)
        return self.add(self.weighted_residual(x), self.residual(a))

    def weighted_residual(self, x: Tensor) -> Tensor:
        """Doge's ``input_residual * residual`` (a trainable vector): a new tensor; the product saves the residual for
        the vector's gradient."""
        if not self.spec.residual_weights:
            return x
        plan = self.plan
        assert plan is not None
        tr = plan.trainable
        pg = self.param_grad(f"resw{len(self.tp.ops)}", self.spec.hidden_size, self.num.param) if tr else ()
        return self.tp.op(x.numel, max(x.elem, self.num.param), (x,), save=(x,) if tr else (), params=pg,
                          rg=x.rg or tr)

    def layer(self, x: Tensor) -> Tensor:
        spec = self.spec
        plan = self.plan
        assert plan is not None
        tr = plan.trainable
        if spec.dual_sublayers:
            from .longcat import longcat_layer

            return longcat_layer(self, x)
        if spec.dsv4:  # DeepSeek-V4: hyper-connections with Sinkhorn mixing, compressed attention (vramplan.dsv4)
            from .dsv4 import dsv4_layer

            return dsv4_layer(self, x)
        if spec.hc_mult:
            from .hyper import hc_layer

            return hc_layer(self, x)
        if spec.normed_residual:
            from .lightning import minimax_layer

            return minimax_layer(self, x)
        if spec.altup_inputs:
            from .gemma3n import gemma3n_layer

            return gemma3n_layer(self, x)
        if plan.mixer == "rwkv":
            from .rwkv import rwkv_block

            return rwkv_block(self, x)
        if plan.mixer == "inkling":
            from .inkling import inkling_layer

            return inkling_layer(self, x)
        if spec.moa:
            from .jetmoe import jetmoe_layer

            return jetmoe_layer(self, x)
        if not plan.mlp or plan.mixer == "none":  # one sublayer per block (Mamba-2, Nemotron-H)
            from .ssm import mamba_block

            return mamba_block(self, x)
        if plan.mixer == "parallel":
            from .ssm import falcon_h1_layer

            return falcon_h1_layer(self, x)
        mixer: Callable[[Tensor], Tensor] = self.self_attention
        if plan.mixer != "attention":
            from .gdn import gdn_mixer
            from .rglru import rglru_mixer
            from .ssm import mamba1_mixer, mamba2_mixer, short_conv_mixer

            def mixer(v: Tensor) -> Tensor:  # the SSM / short-conv / gated DeltaNet / RG-LRU mixer in attention's place
                fn = {"conv": short_conv_mixer, "mamba": mamba1_mixer, "gdn": gdn_mixer,
                      "rglru": rglru_mixer}.get(plan.mixer, mamba2_mixer)
                return fn(self, v)
        if spec.parallel_residual:
            n1 = self.norm(x, spec.hidden_size, tr)
            n2 = self.norm(x, spec.hidden_size, tr) if spec.norms_per_layer >= 2 else n1
            a = self.call(self.self_attention, n1)
            m = self.call(self.mlp, n2)
            y = self.add(self.add(m, a), x)
        elif spec.post_ln:  # OpenAI GPT's Block: n = ln_1(x + attn(x)); h = ln_2(n + mlp(n))
            a = self.call(mixer, x)
            n = self.norm(self.add(x, a), spec.hidden_size, tr)
            m = self.call(self.mlp, n)
            y = self.norm(self.add(n, m), spec.hidden_size, tr)
        elif not spec.pre_norm and plan.mixer == "attention":  # OLMo 2 / EXAONE 4: h = x + norm(attn(x));
            # y = h + norm(mlp(h)) (OLMo Hybrid's gated DeltaNet layers are pre-norm)
            a = self.norm(self.call(self.self_attention, x), spec.hidden_size, tr)
            hmid = self.add(x, a)
            m = self.norm(self.call(self.mlp, hmid), spec.hidden_size, tr)
            y = self.add(hmid, m)
        else:
            n1 = (self.gated_norm(x) if spec.gated_norm_rank else self.norm(x, spec.hidden_size, tr)) \
                if spec.attn_norm else x
            a = self.call(mixer, n1)
            if spec.norms_per_layer == 4:
                a = self.norm(a, spec.hidden_size, tr)
            hmid = self.residual_add(x, a)
            if not plan.mlp:
                self.tp.keep(hmid)
                return hmid
            n2 = self.gated_norm(hmid) if spec.gated_norm_rank and plan.moe else self.norm(hmid, spec.hidden_size, tr)
            # an MLP module call holds its input until it returns; fc1/fc2 called in the layer itself (BioGPT, XGLM:
            # hidden_states rebound) free it after fc1
            m = self.mlp(n2) if spec.mlp_inline else self.call(self.mlp, n2)
            if spec.moe_beside_mlp and plan.moe:
                m = self.moe_beside(m, hmid)
            # the normed input and the attention output stay referenced by the layer's locals through the MLP
            # (StableLmDecoderLayer: residual = residual + self_attn_output, hidden_states not rebound;
            # GPTBigCodeBlock: the attn_outputs tuple)
            held = {"normed": n1, "attn": a}
            if self.probs is not None:
                # the eager attention weights the attention returns stay referenced by the layer's locals to its end:
                # ``hidden_states, _ = self.self_attn(...)`` (LlamaDecoderLayer and its descendants, transformers 5.x);
                # GPTNeoBlock returns (hidden_states, attn_weights) (and the model loop's ``outputs`` holds them
                # until the next block returns: estimator). Training saves them for backward anyway.
                held["probs"] = self.probs
            for what in (*spec.held_through_mlp, *(("probs",) if "probs" in held else ())):
                t = held[what]
                root = t.base if t.base is not None else t
                root.last_use = max(root.last_use, len(self.tp.ops) - 1)
            if spec.norms_per_layer == 4:
                m = self.norm(m, spec.hidden_size, tr)
            y = self.residual_add(hmid, m)
            if spec.per_layer_input:
                y = self.per_layer_branch(y)
        self.tp.keep(y)
        return y

    def gated_norm(self, x: Tensor) -> Tensor:
        """AXK2GatedRMSNorm (modeling_axk2.py): ``y = norm(x)``, then
        ``(y * sigmoid(fc2(silu(fc1(y))).float())).to(y.dtype)``: the fp32 sigmoid saves its result, the promoted
        product saves y and it."""
        plan = self.plan
        assert plan is not None
        h, r = self.spec.hidden_size, self.spec.gated_norm_rank
        y = self.norm(x, h, plan.trainable)
        f1 = self.proj(y, h, r, "fc1")
        f2 = self.proj(self.ew(f1, save_in=True), r, h, "fc2")  # nn.SiLU saves its input
        sg = self.ew(self.cast(f2, 4), save_out=True)
        return self.cast(self.mul(y, sg), y.elem)

    def moe_beside(self, m: Tensor, hmid: Tensor) -> Tensor:
        """Gemma4TextDecoderLayer with enable_moe_block (modeling_gemma4.py): the dense MLP's output normed
        (post_feedforward_layernorm_1); the router reads the residual stream (a weightless RMSNorm, times its
        ``scale`` parameter and hidden ** -0.5, the projection, softmax in fp32, top-k renormalised and times
        ``per_expert_scale[index]``: fp32 weights); the experts run on pre_feedforward_layernorm_2 of the residual
        (grouped_mm dispatch as :meth:`moe`), normed again (post_feedforward_layernorm_2) and added to the first."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, e, k, tr = spec.hidden_size, spec.num_experts, spec.experts_per_token, plan.trainable
        t = hmid.numel // h
        h1 = self.norm(m, h, tr)
        r = self.norm(hmid, h, tr, scale=False)
        r = tp.op(r.numel, r.elem, (r,), save=(r,) if tr else (),
                  params=self.param_grad(f"router.scale{len(tp.ops)}", h, self.num.param) if tr else ())
        r = tp.op(r.numel, r.elem, (r,))  # * scalar_root_size
        logits = self.linear(r, h, e, "router", bias=False, trainable=tr)
        probs = tp.op(t * e, 4, (logits,))  # softmax(dtype=float32) saves its result
        if probs.rg:
            tp.save_output(probs)
        idx = tp.op(t * k, 8, (probs,), rg=False)
        top = tp.op(t * k, 4, (probs, idx), save=(idx,) if probs.rg else (), grad_to=(probs,))
        total = tp.op(t, 4, (top,))  # top_k_weights.sum(-1); the division is in place
        pes = tp.op(t * k, self.num.param, (idx,), rg=tr,
                    params=self.param_grad(f"router.pes{len(tp.ops)}", e, self.num.param) if tr else ())
        w = self.mul(top, pes, elem=4)
        total.last_use = len(tp.ops) - 1
        h2 = self.norm(hmid, h, tr)
        h2 = self.moe(h2, routed=(idx, w))
        h2 = self.norm(h2, h, tr)
        return self.add(h1, h2)

    def per_layer_branch(self, y: Tensor) -> Tensor:
        """The per-layer-input branch closing a Gemma 3n / Gemma 4 layer: ``per_layer_projection(act(
        per_layer_input_gate(h)) * per_layer_input)``, normed (post_per_layer_input_norm) and added to ``h``. The
        layer's slice of the model's per-layer inputs is a view of a tensor the model holds throughout (its
        gradient, summed into that tensor's, is not counted)."""
        return self.add(y, self.per_layer_tail(y))

    def per_layer_tail(self, y: Tensor) -> Tensor:
        """The per-layer-input branch without its residual add (Gemma 3n adds it into AltUp copies 1..A-1)."""
        spec, tp, plan = self.spec, self.tp, self.plan
        assert plan is not None
        h, p, tr = spec.hidden_size, spec.per_layer_input, plan.trainable

        lin = self.proj

        pli = tp.input(self.t * p, resid_elem(self.num), held=True)
        g = lin(y, h, p, "per_layer_input_gate")
        a = self.activation(g)
        prod = self.mul(a, pli)
        o = lin(prod, p, h, "per_layer_projection")
        return self.norm(o, h, tr)


def build_layer(tp: Tape, spec: ModelSpec, num: Numerics, plan: LayerPlan, batch: int, seq: int,
                kv_len: int | None = None) -> Tensor:
    """Record one decoder layer; returns its output (kept: the next layer's input)."""
    spec = spec.at_variant(plan.variant)
    bld = _B(tp, spec, num, batch, seq, plan, kv_len)
    x = tp.input(max(1, spec.altup_inputs, spec.hc_mult) * batch * seq * spec.hidden_size,
                 4 if plan.input_fp32 else resid_elem(num),
                 plan.input_rg)
    y = bld.layer(x)
    # the decoder loop (``hidden_states = layer(hidden_states)``) holds the input until the layer returns
    x.last_use = max(x.last_use, len(tp.ops) - 1)
    return y


def resid_elem(num: Numerics) -> int:
    """The residual stream's dtype: that of the embedding output (fp32 under AMP and QLoRA)."""
    return num.norm_param if (num.amp or num.norm_param == 4) else num.act


def build_embed(tp: Tape, spec: ModelSpec, num: Numerics, batch: int, seq: int, trainable: bool,
                out_rg: bool, attention: Attention = Attention.SDPA) -> Tensor:
    """Token (+ position) embeddings, Gemma's scaling, embedding dropout, and RoPE's cos/sin."""
    bld = _B(tp, spec, num, batch, seq, None)
    t, h = batch * seq, spec.hidden_size
    pe = spec.embed_proj_dim or h
    elem = num.norm_param
    pg = bld.param_grad("embed", spec.vocab_size * pe, elem) if trainable else ()
    x = tp.op(t * pe, elem, (), params=pg, rg=out_rg or trainable)
    if spec.embed_proj_dim:
        x = bld.linear(x, pe, h, "project_in", bias=False, trainable=trainable)
    if spec.position is PositionKind.LEARNED:
        # position_ids (1, seq) (GPT-2, GPTBigCode): a (1, seq, hidden) lookup; OPT's come from the attention mask
        # (batch, seq). The base model's forward holds it until it returns
        rows = seq if spec.positions_unbatched else t
        pos = tp.op(rows * h, elem, (), params=bld.param_grad("wpe", spec.max_learned_positions * h, elem)
                    if trainable else (), rg=trainable)
        x = bld.add(x, pos)
        if spec.positions_unbatched:
            tp.keep(pos)
    if spec.embed_scale:
        x = tp.op(x.numel, x.elem, (x,))
    if spec.embedding_layernorm:
        # the model's forward keeps the un-normed embeddings referenced (``inputs_embeds``) until it returns
        # (BloomModel: word_embeddings_layernorm(inputs_embeds); RwkvModel: block 0's pre_ln)
        if spec.raw_embeds_held:
            tp.keep(x)
        x = bld.norm(x, h, trainable)
    x = bld.dropout(x, spec.hidden_dropout if spec.embedding_dropout is None else spec.embedding_dropout)
    if spec.shared_block is not None:  # Zamba2: original_hidden_states = torch.clone(inputs_embeds), for every
        tp.keep(tp.op(x.numel, x.elem, (x,), rg=False))  # hybrid layer's shared block (its gradient not modelled)
    if spec.per_layer_input:
        _per_layer_inputs(bld, x, trainable)
    if spec.altup_inputs:  # Gemma 3n: the stacked AltUp stream is the layers' input
        from .gemma3n import altup_expand

        x = altup_expand(bld, x, trainable)
    if spec.hc_mult:  # hyper-connections: the embeddings expanded to hc_mult copies (vramplan.hyper)
        from .hyper import hc_expand

        x = hc_expand(bld, x)  # (inputs_embeds stays referenced by the model's forward: estimator._embeds_held)
    if spec.dynamic_mask:  # DogeModel: create_causal_mask(allow_is_causal_skip=False) materialises the boolean mask
        tp.keep_for_forward(tp.op(seq * seq, 1, (), rg=False))  # (1, 1, q, kv), expanded to the batch as a view
    if spec.index_heads and not (attention is Attention.EAGER or (attention is Attention.SDPA and not spec.sdpa)):
        # DeepseekV32Model forces the boolean causal mask (allow_is_causal_skip=False): the indexer masks with it
        tp.keep_for_forward(tp.op(batch * seq * seq, 1, (), rg=False))
    if spec.position is PositionKind.ROPE:
        # one cos/sin pair per layer type (Gemma 4: its own head size each); one pair otherwise
        dims = sorted({spec.layer(i).head_dim for i in range(spec.num_layers)}) if spec.layer_overrides else \
            [spec.head_dim]
        rows = seq if spec.rope_tables_unbatched else t  # position_ids (1, seq) or (batch, seq)
        for d in dims:
            cs = tp.op(2 * rows * d, num.act if not num.amp and spec.rope_style != "fp32_tables" else 4, (), rg=False)
            tp.keep(cs)
    if attention is Attention.SDPA and not spec.sdpa:
        attention = Attention.EAGER  # transformers falls back to eager where the family has no SDPA path
    if attention is Attention.EAGER and spec.family != "gpt2" and not spec.causal_buffer:
        # transformers' eager path gets a 4-D additive float mask (batch, 1, q, kv); GPT-2 slices a buffer
        mask = tp.op(batch * seq * seq, num.act, (), rg=False)
        if spec.mask_bool:  # MptModel: create_causal_mask(...).to(torch.bool), the float mask dropped at once
            mask = tp.op(batch * seq * seq, 1, (mask,), rg=False)
        tp.keep_for_forward(mask)
        if spec.sliding_layers and len(spec.sliding_layers) < spec.num_layers:
            # models mixing full and sliding layers build one mask per layer type (transformers'
            # create_causal_mask and create_sliding_window_causal_mask, both live for the whole forward)
            tp.keep_for_forward(tp.op(batch * seq * seq, num.act, (), rg=False))
    elif spec.sliding_layers and window_masked(spec, seq) and \
            attention is not Attention.FLASH:
        # the boolean sliding-window (or chunked) mask for SDPA: without a padding mask, sdpa_mask (masking_utils.py)
        # builds it from the positions alone, (1, 1, S, S), and expands it over the batch as a view
        mask = tp.op(seq * seq, 1, (), rg=False)
        tp.keep_for_forward(mask)
    tp.keep(x)
    return x


def _per_layer_inputs(bld: _B, x: Tensor, trainable: bool) -> None:
    """Per-layer embeddings (modeling_gemma4.py Gemma4TextModel.get_per_layer_inputs / project_per_layer_inputs):
    a lookup in ``embed_tokens_per_layer`` (num_layers x per-layer width per token) times its scale; the scaled
    embeddings projected to the same width (``per_layer_model_projection``) times hidden ** -0.5, an RMSNorm over
    each layer's slice, the sum of both times 2 ** -0.5. The result is held until the forward returns (each
    layer reads its slice)."""
    tp, spec, num = bld.tp, bld.spec, bld.num
    width = spec.num_layers * spec.per_layer_input
    t = bld.t
    elem = num.norm_param
    pg = bld.param_grad("embed_per_layer", spec.per_layer_vocab * width, elem) if trainable else ()
    tok = tp.op(t * width, elem, (), params=pg, rg=trainable)
    tok = tp.op(tok.numel, tok.elem, (tok,))  # * embed_scale
    proj = bld.linear(x, spec.hidden_size, width, "per_layer_model_projection", bias=False, trainable=trainable)
    proj = tp.op(proj.numel, proj.elem, (proj,))  # * per_layer_model_projection_scale
    proj = bld.norm(proj, spec.per_layer_input, trainable)
    both = bld.add(proj, tok)
    out = tp.op(both.numel, both.elem, (both,))  # * per_layer_input_scale
    tp.keep(out)


# TRL SFTTrainer's entropy metric (trl/trainer/utils.py ``entropy_from_logits``, v1.9.0): rows per chunk
TRL_ENTROPY_CHUNK = 128
# TRL chunked_nll (trl/trainer/sft_trainer.py ``_CHUNKED_LM_HEAD_CHUNK_SIZE``, v1.8.0-v1.9.0): tokens per chunk
TRL_CE_CHUNK = 256


def build_head(tp: Tape, spec: ModelSpec, num: Numerics, batch: int, seq: int, *, trainable: bool,
               input_rg: bool, logits_tokens: int, loss: bool, head_trainable: bool | None = None,
               keep_logits: bool = True, loss_kind: str = "standard", chunk: int = 0,
               metrics: bool = False) -> Tensor | None:
    """Final norm, output projection and (training) the causal-LM loss.

    ``loss_kind`` "standard": transformers' ``ForCausalLMLoss`` upcasts the logits with ``logits.float()`` and
    calls ``cross_entropy`` (log_softmax, which saves its fp32 result, then nll_loss). ``keep_logits``: the
    model output keeps the 16-bit logits alive after the forward (a hand-written loop that holds ``out``);
    otherwise they die when the loss has been computed (transformers ``Trainer.compute_loss`` returns only the
    loss). ``metrics``: TRL ``SFTTrainer.compute_loss`` then computes entropy and token accuracy from the
    logits under ``no_grad``. "chunked", "liger-fused" and "cce" never materialise the logits
    (:func:`_chunked_loss`, :func:`_liger_loss`, :func:`_cce_loss`); they return None.
    """
    bld = _B(tp, spec, num, batch, seq, None)
    h = spec.hidden_size
    x = tp.input(max(1, spec.altup_inputs, spec.hc_mult) * batch * seq * h, 4 if spec.residual_fp32 else
                 resid_elem(num), input_rg)
    if spec.altup_inputs:  # Gemma 3n: the AltUp stream back to one copy
        from .gemma3n import altup_unembed

        x = altup_unembed(bld, x, trainable)
    if spec.dsv4:  # DeepSeek-V4's HC head (vramplan.dsv4)
        from .dsv4 import dsv4_head

        x = dsv4_head(bld, x, trainable)
    elif spec.hc_mult:  # the HC head: the hyper-connection copies collapsed by one more weighting (vramplan.hyper)
        from .hyper import hc_collapse

        x = hc_collapse(bld, x, "hc_head", trainable, post=False)[1]
    n = bld.norm(x, h, trainable) if spec.final_norm else x
    if spec.residual_fp32 or spec.head_fp32:
        # lm_head(hidden_states.to(lm_head.weight.dtype)) (modeling_mamba2.py; HY-V4's fp32 lm_head)
        n = bld.cast(n, 4 if spec.head_fp32 else num.norm_param)
    if spec.head_input_scale:  # MiniCPM3ForCausalLM: hidden_states / logits_scaling, then the last-token slice
        n = tp.op(n.numel, n.elem, (n,))
    if logits_tokens != batch * seq:
        n = tp.op(logits_tokens * h, n.elem, (n,))  # hidden_states[:, -k:, :]
    if spec.head_transform:  # ModernBertDecoderPredictionHead: norm(act(dense(x)))
        n = bld.linear(n, h, h, "head.dense", bias=spec.head_transform_bias, trainable=trainable)
        n = bld.activation(n)
        n = bld.norm(n, h, trainable)
    pe = spec.embed_proj_dim or h
    if spec.embed_proj_dim:
        n = bld.linear(n, h, pe, "project_out", bias=False, trainable=trainable)
    head_elem = 4 if spec.head_fp32 else num.norm_param
    head_tr = trainable if head_trainable is None else head_trainable
    if loss and loss_kind != "standard":
        fused = {"chunked": _chunked_loss, "liger-fused": _liger_loss, "cce": _cce_loss}[loss_kind]
        fused(bld, n, pe, head_elem, head_tr, batch, seq, chunk)
        return None
    logits = bld.linear(n, pe, spec.vocab_size, "embed" if spec.tie_word_embeddings else "lm_head",
                        bias=spec.lm_head_bias, trainable=head_tr, out_kind=LOGITS, weight_elem=head_elem)
    if spec.logit_softcap and spec.logit_softcap_fp32:
        # BeamForCausalLM: logits.float() / cap, tanh (saves its result), * cap: fp32 logits from here on
        logits = tp.op(logits.numel, 4, (bld.cast(logits, 4),), kind=LOGITS)
        logits = tp.op(logits.numel, 4, (logits,), kind=LOGITS)
        if logits.rg:
            tp.save_output(logits)
        logits = tp.op(logits.numel, 4, (logits,), kind=LOGITS)
    elif spec.logit_softcap:
        logits = tp.op(logits.numel, logits.elem, (logits,), kind=LOGITS)
        logits = tp.op(logits.numel, logits.elem, (logits,), kind=LOGITS)
        if logits.rg:
            tp.save_output(logits)
        logits = tp.op(logits.numel, logits.elem, (logits,), kind=LOGITS)
    if spec.logit_scale:  # Granite: logits / logits_scaling; Cohere: logits * logit_scale
        logits = tp.op(logits.numel, logits.elem, (logits,), kind=LOGITS)
    if spec.family == "gptj" or spec.logits_fp32:
        logits = tp.op(logits.numel, 4, (logits,), kind=LOGITS)  # GPTJForCausalLM: lm_head(...).to(float32)
    if keep_logits or not loss:
        tp.keep(logits)
    if loss:
        l32 = bld.cast(logits, 4)
        ls = tp.op(l32.numel, 4, (l32,), kind=LOGITS)
        tp.save_output(ls)
        lo = tp.op(1, 4, (ls,), save=(ls,), kind=LOGITS)
        tp.keep(lo)
        if metrics:
            _trl_metrics(bld, logits, batch, seq)
        # the model output holds the logits until the loop drops it (compute_loss returns)
        logits.last_use = max(logits.last_use, len(tp.ops) - 1)
    return logits


def _trl_metrics(bld: _B, logits: Tensor, batch: int, seq: int) -> None:
    """TRL ``SFTTrainer.compute_loss`` (trl/trainer/sft_trainer.py, v1.9.0), loss_type nll, under no_grad:
    ``entropy_from_logits(outputs.logits[..., :-1, :])`` reshapes the shifted logits to (N, V) (a copy when
    batch > 1: the slice is not contiguous across rows), then per chunk of 128 rows ``log_softmax``, ``exp``
    and their product live together (fp32 under autocast: log_softmax is on its fp32 list); ``argmax`` and
    the masks are token-sized."""
    tp, num = bld.tp, bld.num
    v = bld.spec.vocab_size
    rows = batch * (seq - 1)
    copy = rows * v * logits.elem if batch > 1 else 0
    elem = 4 if num.amp else logits.elem
    chunk = min(TRL_ENTROPY_CHUNK, rows) * v
    scratch = copy + 3 * chunk * elem
    tp.op(rows * 8, 8, (logits,), rg=False, kind=LOGITS, fwd_scratch=scratch)  # argmax predictions


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _head_name(spec: ModelSpec) -> str:
    return "embed" if spec.tie_word_embeddings else "lm_head"


def _chunked_loss(bld: _B, n: Tensor, pe: int, w_elem: int, head_tr: bool, batch: int, seq: int,
                  chunk: int) -> None:
    """TRL ``loss_type="chunked_nll"`` (trl/trainer/sft_trainer.py ``_chunked_cross_entropy_loss``, v1.9.0).

    The base model's last hidden state is shifted (``[..., :-1, :].reshape``: a copy when batch > 1), its valid
    tokens gathered to the front (``hidden[order]``, a copy), and every chunk of ``chunk`` tokens runs
    ``h.float() @ w.float().t()``, log_softmax, nll, argmax and the entropy under non-reentrant
    ``torch.utils.checkpoint``: nothing of a chunk is kept in the forward, and the backward recomputes one chunk
    at a time. ``w.float()`` copies a 16-bit head weight to fp32 (V x H x 4) in every chunk's forward and
    recomputation; the recomputation keeps it (mm saves it for the hidden state's gradient), log_p (log_softmax
    saves its result) and the fp32 hidden chunk when the head trains.
    """
    tp, spec = bld.tp, bld.spec
    v = spec.vocab_size
    rows = batch * (seq - 1)
    c = min(chunk or TRL_CE_CHUNK, rows)
    eh = n.elem
    src = tp.op(rows * pe, eh, (n,)) if batch > 1 else n  # the shifted slice, reshaped
    idx = tp.op(rows, 8, (), rg=False)  # argsort of the label mask
    hg = tp.op(rows * pe, eh, (src, idx), save=(idx,), grad_to=(src,))  # hidden[order]
    w32 = v * pe * 4 if w_elem != 4 else 0
    h32 = c * pe * 4 if eh != 4 else 0
    cv = c * v * 4
    fwd = max(h32 + w32 + cv, 4 * cv)  # at the matmul; at log_p * exp(log_p) with the logits alive
    kept = w32 + (h32 if head_tr else 0) + cv  # what the recomputation keeps: w.float(), h.float(), log_p
    recompute = kept + 3 * cv  # its own peak: logits, exp and the product besides log_p
    ce_bwd = kept + 2 * cv  # nll and log_softmax backward: grad of log_p, grad of the logits
    # mm backward: log_p gone, the logits' gradient, dh32 and (the head trains) dw32 beside the saved w32/h32
    mm_bwd = kept + c * pe * 4 + (v * pe * 4 if head_tr else 0)
    # then dw32 is cast back to the weight dtype (mm's saved tensors are released); from the second chunk on the
    # head's gradient buffer exists besides (the op's parameter gradient below)
    cast_bwd = v * pe * 4 + v * pe * w_elem if head_tr and w_elem != 4 else 0
    slice_bwd = rows * pe * eh  # each chunk's slice backward materialises a hidden-sized gradient
    pg = bld.param_grad(_head_name(spec), v * pe, w_elem) if head_tr else ()
    scratch = max(recompute, ce_bwd, mm_bwd, cast_bwd)
    if head_tr and -(-rows // c) == 1:
        # one chunk: its backward runs before the head's gradient exists (the replay counts it at this op)
        scratch = max(max(recompute, ce_bwd, mm_bwd) - v * pe * w_elem, cast_bwd - v * pe * w_elem)
    lo = tp.op(1, 4, (hg,), save=(hg,), params=pg, kind=LOGITS, grad_to=(hg,), rg=True,
               fwd_scratch=fwd, bwd_scratch=scratch + slice_bwd)
    tp.keep(lo)


def _liger_loss(bld: _B, n: Tensor, pe: int, w_elem: int, head_tr: bool, batch: int, seq: int,
                chunk: int) -> None:
    """Liger ``LigerFusedLinearCrossEntropyFunction`` (src/liger_kernel/ops/fused_linear_cross_entropy.py,
    ``fused_linear_cross_entropy_forward``): the gradients are computed in the forward. It allocates
    ``grad_input`` (BT x H, the input's dtype), ``grad_weight`` (V x H, the weight's dtype; accum_dtype None)
    when the head trains, and a fp32 per-token loss; then for chunks of
    ``next_power_of_2(ceil(BT / ceil(V / H)))`` rows it computes the chunk's logits (chunk x V, input dtype,
    overwritten in place by their gradient), ``grad_logits @ weight`` into grad_input and
    ``grad_weight += mm(grad_logits.T, x).float()`` (a V x H temporary in the input dtype and its fp32 copy).
    Backward returns the stored gradients: grad_weight becomes the head's ``.grad``.
    """
    tp, spec = bld.tp, bld.spec
    v = spec.vocab_size
    bt = batch * seq
    eh = n.elem
    c = chunk or _pow2(-(-bt // -(-v // pe)))
    c = min(c, bt)
    gi = tp.op(bt * pe, eh, (), rg=False)  # grad_input
    gw = tp.op(v * pe, w_elem, (), rg=False, kind=MemoryKind.GRADIENTS) if head_tr else None
    loss1d = tp.op(bt, 4, (), rg=False, kind=LOGITS)
    gw_tmp = v * pe * eh + (v * pe * 4 if eh != 4 else 0) if head_tr else 0
    fwd = c * v * eh + max(c * pe * eh, gw_tmp)
    pg = bld.param_grad(_head_name(spec), v * pe, w_elem) if head_tr else ()
    saved = (gi,) + ((gw,) if gw is not None else ())
    # backward: grad_input becomes the hidden state's gradient and grad_weight the head's .grad; both were
    # allocated in the forward, so nothing new appears (the negative scratch cancels the replay's
    # allocate-then-free of the same buffers)
    lo = tp.op(1, 4, (n, loss1d), save=saved, params=pg, kind=LOGITS, grad_to=(n,), rg=True, fwd_scratch=fwd,
               bwd_scratch=-sum(t.nbytes for t in saved))
    tp.keep(lo)


def _cce_loss(bld: _B, n: Tensor, pe: int, w_elem: int, head_tr: bool, batch: int, seq: int,
              chunk: int) -> None:
    """Apple Cut Cross-Entropy (cut_cross_entropy/cce.py ``LinearCrossEntropyFunction``, cce_lse_forward.py,
    cce_backward.py; ml-cross-entropy d42911f). The forward's blockwise kernels write only the fp32 log-sum-exp
    and the target logit per token and, for gradient filtering, the fp32 average logit per vocabulary entry;
    it saves the hidden states and the classifier. Backward allocates the hidden-state gradient and (the head
    trains) the classifier's gradient, and sorts the vocabulary by the average logit (int64 argsort, int32
    copy)."""
    tp, spec = bld.tp, bld.spec
    v = spec.vocab_size
    bt = batch * seq
    lse = tp.op(bt, 4, (), rg=False, kind=LOGITS)
    avg = tp.op(v, 4, (), rg=False, kind=LOGITS)
    pg = bld.param_grad(_head_name(spec), v * pe, w_elem) if head_tr else ()
    lo = tp.op(1, 4, (n, lse, avg), save=(n, lse, avg), params=pg, kind=LOGITS, grad_to=(n,), rg=True,
               fwd_scratch=bt * 4, bwd_scratch=v * 12)
    tp.keep(lo)
