"""Peak GPU memory of image models: backbones, diffusion denoisers and pipelines, StyleGAN2.

Every network is recorded op by op on a :class:`~vramplan._engine.tape.Tape` (:mod:`._layers` and the model
modules) and replayed as the CUDA caching allocator sees it (:mod:`vramplan._engine.replay`); model states come from
:mod:`._states`. The workloads mirror the calibration harness (``measure.py``'s ``run_vision`` and
``run_unet``) for single networks, the diffusers pipelines for inference, diffusers' DreamBooth scripts
for pipeline training, and NVlabs' ``training_loop.py`` for StyleGAN2-ADA.

Known limits: one GPU; cuDNN convolution workspaces are not modelled (they are allocated and freed
inside each call; the calibration set puts them within 2.5% of the peak); allocator block rounding is
modelled for parameter-sized tensors only; the StyleGAN regularization passes (``create_graph``) are
estimated as twice the forward's saved tensors; DreamBooth's text encoders run with the shapes of
``max_length`` padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache

from .._engine.numerics import Numerics
from .._engine.replay import backward as replay_backward
from .._engine.replay import create_graph_bytes
from .._engine.replay import forward as replay_forward
from .._engine.step import ALLOCATOR_SLACK_FRACTION, CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, finish, workload_dict
from .._engine.step import phase_peak as phase
from .._engine.step import states_moment as state_moment
from .._engine.tape import Moment, Tensor
from ..allocator import DEFAULT_CONF, AllocStats, block_bytes, simulate
from ..errors import WorkloadError
from ..kinds import MemoryKind, Phase
from ..memory import ModelStates
from ..result import Estimate, PhasePeak
from ..units import GiB
from ..workload import Optimizer, Precision
from ._backbones import build_backbone
from ._catalog import VisionEntry, component
from ._dit import DiTRun, build_dit
from ._layers import Layers
from ._specs import (
    DiTSpec,
    UNetSpec,
    VAESpec,
    backbone_from_config,
    dit_from_config,
    stylegan_from_config,
    text_encoder_from_config,
    unet_from_config,
    vae_from_config,
)
from ._states import model_states
from ._steps import StepResult, train_step
from ._stream import pipeline_events, vision_events
from ._stylegan import build_discriminator, build_generator
from ._text import build_text_encoder
from ._unet import UNetRun, build_unet
from ._vae import build_vae_decoder, build_vae_encoder
from ._workload import VisionMethod, VisionWorkload

__all__ = ["estimate_entry"]

K = MemoryKind
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ---- numerics -------------------------------------------------------------------------------------------
def adapter_elem(p: Precision) -> int:
    """Bytes per element of the LoRA adapters (their gradients and optimizer states) in diffusers' LoRA workflow.

    diffusers' LoRA training scripts (``examples/text_to_image/train_text_to_image_lora.py``,
    ``train_text_to_image_lora_sdxl.py``, ``examples/dreambooth/train_dreambooth_lora.py``,
    ``train_dreambooth_lora_sdxl.py``, ``_sd3.py``, ``_flux.py``) cast the frozen denoiser (and text encoders) to
    ``weight_dtype`` (fp16 / bf16 under ``--mixed_precision fp16`` / ``bf16``, else fp32), then call
    ``unet.add_adapter(LoraConfig(...))``; only ``if args.mixed_precision == "fp16"`` do they upcast the adapters with
    ``cast_training_params(unet, dtype=torch.float32)`` (``diffusers/training_utils.py``). ``add_adapter``
    (``diffusers/loaders/peft.py`` ``PeftAdapterMixin``; transformers' ``integrations/peft.py`` for the text
    encoders) calls peft's ``inject_adapter_in_model`` (``peft/mapping.py``): the tuner's ``inject_adapter`` creates
    each adapter and ``_move_adapter_to_device_of_base_layer`` (``peft/tuners/tuners_utils.py``) gives it the base
    layer's dtype. peft's fp32 upcast (``cast_adapter_dtype``, ``autocast_adapter_dtype=True``) runs only in
    ``PeftModel.__init__`` (``peft/peft_model.py``, i.e. ``get_peft_model``), which this path never calls (peft 0.21).
    So: fp32 under fp32 and fp16 mixed precision, the base's 16-bit dtype otherwise (bf16 mixed precision, and
    bf16/fp16 weights without autocast, where the base is cast before ``add_adapter`` as well).
    """
    return 4 if p in (Precision.FP32, Precision.AMP_FP16) else 2


def _numerics(w: VisionWorkload, training: bool, *, frozen_base: bool = False) -> Numerics:
    """bf16/fp16: weights and activations 16-bit; amp: fp32 weights + autocast; fp32: everything fp32.

    ``frozen_base``: LoRA keeps the frozen base in the 16-bit compute dtype (diffusers' ``weight_dtype``); the
    adapters take :func:`adapter_elem` (``Numerics.lora_param``).
    """
    p = w.precision
    lora = adapter_elem(p)
    if p is Precision.FP32:
        return Numerics(training, 4, 4, False, lora_param=lora)
    if p.is_amp:
        return Numerics(training, 2, 2 if frozen_base else 4, True, lora_param=lora)
    return Numerics(training, 2, 2, False, lora_param=lora)


def _weight_elem(w: VisionWorkload) -> int:
    """Bytes per element of frozen helper models (VAE, text encoders): the 16-bit compute dtype unless fp32."""
    return 4 if w.precision is Precision.FP32 else 2


def _infer_elem(w: VisionWorkload) -> int:
    return 2 if w.precision in (Precision.BF16, Precision.FP16) else 4


# ---- resolution -----------------------------------------------------------------------------------------
def _native_resolution(entry: VisionEntry) -> int:
    cfg = entry.config
    if entry.kind == "pipeline":
        return int(cfg["resolution"])
    if entry.kind == "unet":
        return int(cfg.get("sample_size", 64)) * 8
    if entry.kind == "dit":
        if cfg.get("_class_name") == "FluxTransformer2DModel":
            return 1024
        return int(cfg.get("sample_size", 32)) * 8
    if entry.kind == "stylegan":
        return int(cfg["resolution"])
    return int(cfg.get("image_size", 224))


def _check_resolution(entry: VisionEntry, res: int) -> None:
    kind = entry.kind
    if kind == "pipeline":
        den = component(str(entry.config["denoiser"]))
        _check_resolution(den, res)
        return
    if kind == "unet":
        spec = unet_from_config(entry.config)
        f = 8 * 2**spec.downsamples
        if res % f:
            raise WorkloadError(f"resolution {res} does not fit {entry.name}: it must be a multiple of {f} "
                                f"(VAE factor 8 x {2**spec.downsamples} for the UNet's {spec.downsamples} "
                                f"downsamplings)")
    elif kind == "dit":
        d = dit_from_config(entry.config)
        f = 8 * d.patch_size
        if res % f:
            raise WorkloadError(f"resolution {res} does not fit {entry.name}: it must be a multiple of {f} "
                                f"(VAE factor 8 x patch size {d.patch_size})")
        if d.kind == "sd3" and res // f > d.pos_embed_max_size:
            raise WorkloadError(f"resolution {res} exceeds {entry.name}'s position table "
                                f"({d.pos_embed_max_size * f} pixels)")
    elif kind == "backbone":
        b = backbone_from_config(entry.config)
        if b.kind == "vit" and res % b.patch_size:
            raise WorkloadError(f"resolution {res} does not fit {entry.name}: it must be a multiple of the "
                                f"patch size {b.patch_size}")
        if b.kind == "convnext" and res % 32:
            raise WorkloadError(f"resolution {res} does not fit {entry.name}: it must be a multiple of 32")
        if res < 32:
            raise WorkloadError(f"resolution {res} is too small for {entry.name}; use at least 32")
    elif kind == "stylegan":
        r = int(entry.config["resolution"])
        if res != r:
            raise WorkloadError(f"{entry.name} generates {r} x {r} images; pick the catalog entry for {res} "
                                f"(stylegan2-128/256/512/1024)")


# ---- denoisers ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Den:
    """One denoiser call's inputs and output on a tape."""

    pred: Tensor
    latent: Tensor
    cond_bytes: int  # bytes of the conditioning inputs (text states, pooled, time ids)


def _denoiser(L: Layers, entry: VisionEntry, batch: int, res: int, *, trainable: bool, lora: int, ckpt: bool,
              eager: bool, elem: int, latent: Tensor | None = None, text: tuple[Tensor, ...] = (),
              targets: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> _Den:
    lat = res // 8
    if entry.kind == "unet":
        spec: UNetSpec = unet_from_config(entry.config)
        x = latent if latent is not None else L.input(batch * spec.in_channels * lat * lat, elem)
        ctx = text[0] if text else L.input(batch * 77 * spec.cross_attention_dim, elem)
        L.input(batch, 8)  # timesteps
        extra: tuple[Tensor, ...] = ()
        if spec.addition_embed_type == "text_time":
            pooled = text[1] if len(text) > 1 else L.input(batch * (spec.projection_class_embeddings_input_dim
                                                                    - 6 * spec.addition_time_embed_dim), elem)
            extra = (pooled, L.input(batch * 6, elem))
        pred = build_unet(L, spec, UNetRun(batch, lat, lat, trainable=trainable, lora_rank=lora, checkpointing=ckpt,
                                           eager=eager, lora_targets=targets), x, ctx, extra)
        return _Den(pred, x, ctx.nbytes + sum(t.nbytes for t in extra))
    d: DiTSpec = dit_from_config(entry.config)
    if d.kind == "flux":
        x = latent if latent is not None else L.input(batch * (lat // 2) ** 2 * d.in_channels, elem)
    else:
        x = latent if latent is not None else L.input(batch * d.in_channels * lat * lat, elem)
    txt = text[0] if text else (L.input(batch * d.text_len * d.joint_attention_dim, elem)
                                if d.joint_attention_dim else None)
    pooled_t = text[1] if len(text) > 1 else (L.input(batch * d.pooled_projection_dim, elem)
                                              if d.pooled_projection_dim else None)
    L.input(batch, 8)
    pred = build_dit(L, d, DiTRun(batch, lat, lat, trainable=trainable, lora_rank=lora, checkpointing=ckpt,
                                  eager=eager, lora_targets=targets), x, txt, pooled_t)
    cond = (txt.nbytes if txt is not None else 0) + (pooled_t.nbytes if pooled_t is not None else 0)
    return _Den(pred, x, cond)


def _frozen_trained(L: Layers) -> tuple[list[int], list[int], list[int]]:
    """(frozen, trained base, adapter) tensor sizes recorded on ``L``."""
    frozen: list[int] = []
    trained: list[int] = []
    adapters: list[int] = []
    for name, sizes in L.param_tensors.items():
        if name not in L.trainable_names:
            frozen += sizes
        elif ".lora_" in name:
            adapters += sizes
        else:
            trained += sizes
    return frozen, trained, adapters


def _buffers(L: Layers, elem: int) -> Moment:
    return Moment.of({K.WEIGHTS: sum(block_bytes(n * elem) for n in L.buffers.values())})


@cache
def _component_tensors(name: str) -> tuple[int, ...]:
    """A pipeline component's parameter tensors (elements, creation order), recorded once (batch 1) per process."""
    e = component(name)
    L = Layers(Numerics(False, 2, 2, False))
    if e.kind == "vae":
        spec = vae_from_config(e.config)
        z = L.input(spec.latent_channels * 64, 2)
        build_vae_decoder(L, spec, z, 1, 8, 8)
        img = L.input(3 * 64 * 64, 2)
        build_vae_encoder(L, spec, img, 1, 64, 64)
    elif e.kind == "text_encoder":
        build_text_encoder(L, text_encoder_from_config(e.config), 1, e.name + ".")
    return tuple(L.tensor_sizes())


def _weights_of(name: str, elem: int) -> int:
    return sum(block_bytes(n * elem) for n in _component_tensors(name))


# ---- workloads ------------------------------------------------------------------------------------------
class _Run:
    """Collects phases, assumptions and warnings for one estimate."""

    def __init__(self, entry: VisionEntry, w: VisionWorkload, res: int) -> None:
        self.e, self.w, self.res = entry, w, res
        self.phases: list[PhasePeak] = []
        self.assumptions: list[str] = [
            "peak as torch.cuda.max_memory_allocated reports it (PyTorch >= 2.5, diffusers 0.42, one GPU)",
            f"{res} x {res} pixels, batch {w.batch_size}, {w.precision.value}",
        ]
        self.warnings: list[str] = []
        self.parameters = 0
        self.trainable = 0
        self.top = (-1, "")
        self.reserved: AllocStats | None = None  # from the allocation stream, where it is modelled
        # how the stream creates the weights
        self.weights_loaded = ("the weights created in fp32 and cast (model.to(dtype)) as the calibration harness "
                               "builds them")

    def add(self, p: Phase, m: Moment, where: str = "") -> None:
        if m.total > self.top[0]:
            self.top = (m.total, where)
        for i, old in enumerate(self.phases):
            if old.phase is p:
                if m.total > old.peak_allocated_bytes:
                    self.phases[i] = phase(p, m)
                return
        self.phases.append(phase(p, m))

    def note_states(self, st: ModelStates) -> None:
        self.assumptions.extend(n for n in st.notes if n not in self.assumptions)

    def add_training_step(self, st: ModelStates, r: StepResult) -> None:
        """Record one training step's phases and the model states behind them."""
        self.trainable = st.trainable_parameters
        self.note_states(st)
        self.add(Phase.FORWARD, r.forward)
        self.add(Phase.BACKWARD, r.backward)
        self.add(Phase.OPTIMIZER_STEP, r.step)


def _lora_note(w: VisionWorkload, where: str) -> str:
    """The LoRA workflow the estimate follows (diffusers' LoRA training scripts; :func:`adapter_elem`)."""
    p = w.precision
    base = "fp32" if p is Precision.FP32 else ("fp16" if p in (Precision.FP16, Precision.AMP_FP16) else "bf16")
    ad = "fp32" if adapter_elem(p) == 4 else base
    cast = (", then cast_training_params(..., torch.float32)" if p is Precision.AMP_FP16 else
            "" if p is Precision.FP32 else " (cast_training_params only under fp16 mixed precision)")
    return (f"LoRA r={w.lora_rank} on {where} as diffusers' LoRA training scripts set it up: base frozen and cast to "
            f"{base} (weight_dtype), then add_adapter(LoraConfig(...)) (peft inject_adapter_in_model: adapters in the "
            f"base's dtype){cast}; adapters, their gradients and AdamW states in {ad}")


def _attention_note(run: _Run) -> None:
    if run.w.eager_attention:
        run.assumptions.append("attention: eager (diffusers AttnProcessor: baddbmm + softmax, the (B*H, Sq, Sk) "
                               "scores and probabilities are materialized)")
    else:
        run.assumptions.append("attention: scaled_dot_product_attention (fused cuDNN/flash kernels for 16-bit "
                               "head_dim <= 256, memory-efficient kernel otherwise)")


def _backbone(run: _Run) -> None:
    e, w, res = run.e, run.w, run.res
    spec = backbone_from_config(e.config)
    training = w.is_train
    if w.method is not VisionMethod.FULL:
        raise WorkloadError(f"{e.name}: only full training is modelled for backbones (got --method {w.method})")
    num = _numerics(w, training)
    L = Layers(num)
    b = w.batch_size
    x = L.input(b * 3 * res * res, 2 if w.precision in (Precision.BF16, Precision.FP16) else 4)
    L.input(b, 8)  # labels
    out = build_backbone(L, spec, x, b, res, trainable=True)
    bn_buffers = sum(2 * n for name, (n, *_rest) in L.param_tensors.items() if "bn" in name or "downsample.1" in name)
    run.parameters = L.parameters
    st = model_states([], num.param, L.tensor_sizes(), num.param, amp=num.amp, training=training,
                      optimizer=w.optimizer)
    extra = Moment.of({K.WEIGHTS: bn_buffers * 4})
    if training:
        L.end_autocast()
        loss = L.cross_entropy(out, 1000)
        run.add_training_step(st, train_step(L, st, (loss,), extra, grads_persist=w.grads_persist))
        run.reserved = _reserved(L, num.param, (loss,), w, st, bn_buffers)
        run.assumptions.append("training step as torchvision reference scripts run it: cross-entropy on "
                               "model(x).float(), backward, optimizer.step(), zero_grad(set_to_none=True)")
    else:
        L.end_autocast()
        run.add(Phase.FORWARD, replay_forward(L, state_moment(st, workspace_handles=1) + extra).peak)
        run.assumptions.append("inference: one forward under torch.inference_mode()")
        run.reserved = _reserved(L, num.param, (), w, st, bn_buffers)


def _bare_denoiser(run: _Run) -> None:
    """The denoiser alone, as ``measure.py``'s ``run_unet``: random latents and text states."""
    e, w, res = run.e, run.w, run.res
    training = w.is_train
    lora = w.lora_rank if (training and w.method is VisionMethod.LORA) else 0
    num = _numerics(w, training, frozen_base=bool(lora))
    L = Layers(num)
    elem = 4 if (num.param == 4 and not (num.amp and lora)) else 2
    den = _denoiser(L, e, w.batch_size, res, trainable=True, lora=lora, ckpt=w.gradient_checkpointing and training,
                    eager=w.eager_attention, elem=elem, targets=w.lora_targets)
    frozen, trained, adapters = _frozen_trained(L)
    run.parameters = L.parameters - sum(adapters)
    st = model_states(frozen, 2 if lora and num.param == 2 else num.param, trained, num.param, amp=num.amp and not lora,
                      training=training, optimizer=w.optimizer, adapters=adapters, adapter_elem=num.lora_param)
    extra = _buffers(L, num.param)
    _attention_note(run)
    if training:
        L.end_autocast()
        L.keep(den.pred)
        loss = L.mse_loss(den.pred, den.latent)
        run.add_training_step(st, train_step(L, st, (loss,), extra, grads_persist=w.grads_persist))
        run.reserved = _reserved(L, num.param, (loss,), w, st)
        run.assumptions.append("training step as the calibration harness runs it: MSE of the prediction against "
                               "the latents, AdamW, prediction kept until after the step")
        if lora:
            run.assumptions.append(_lora_note(w, ", ".join(w.lora_targets)))
        if w.gradient_checkpointing:
            run.assumptions.append("gradient checkpointing: diffusers enable_gradient_checkpointing() (resnets and "
                                   "transformer blocks recomputed, non-reentrant)")
    else:
        L.end_autocast()
        run.add(Phase.FORWARD, replay_forward(L, state_moment(st, workspace_handles=1) + extra).peak)
        run.reserved = _reserved(L, num.param, (), w, st)
        run.assumptions.append("inference: one denoising step of the denoiser at the given batch (no "
                               "classifier-free guidance doubling; use --pipeline for a sampling loop)")


def _reserved(L: Layers, elem: int, seeds: tuple[Tensor, ...], w: VisionWorkload, st: ModelStates,
              buffer_elems: int = 0, *, frozen_elem: int | None = None, helpers: Sequence[int] = (),
              staged: bool = True) -> AllocStats:
    """What the caching allocator reserves for the run of ``L`` (see :mod:`._stream`): trained tensors in ``elem``,
    frozen ones in ``frozen_elem`` (default ``elem``), peft adapters (in ``L.num.lora_param``) created after the base
    model;
    ``helpers``: bytes of the tensors of models that run outside ``L``'s parameters (a DreamBooth run's VAE), loaded
    first; ``staged``: the harness's fp32 creation and cast, else a load in the final dtypes."""
    fe = elem if frozen_elem is None else frozen_elem
    adapters = [name for name in L.param_tensors if ".lora_" in name]
    params = [(n, elem if name in L.trainable_names else fe) for name, sizes in L.param_tensors.items()
              if name not in adapters for n in sizes]
    ae = L.num.lora_param
    late = [n * ae for name in adapters for n in L.param_tensors[name]]
    trained = [n * (ae if name in adapters else elem) for name in L.param_tensors if name in L.trainable_names
               for n in L.param_tensors[name]] if seeds else []
    buffers = list(helpers) + [n * elem for n in L.buffers.values()] + ([buffer_elems * 4] if buffer_elems else [])
    events = vision_events(L, params, seeds, training=bool(seeds), opt_sizes=trained, optimizer=w.optimizer,
                           buffers=buffers, late_params=late, accumulation=w.gradient_accumulation,
                           keep_grads=not w.set_grads_to_none, staged=staged)
    return simulate(events, DEFAULT_CONF)


def _text_states(L: Layers, entry: VisionEntry, batch: int, elem: int) -> tuple[Tensor, ...]:
    """Inputs for the denoiser that the pipeline's text encoders produce (prompt embeddings, pooled)."""
    den = component(str(entry.config["denoiser"]))
    if den.kind == "unet":
        spec = unet_from_config(den.config)
        ctx = L.input(batch * 77 * spec.cross_attention_dim, elem)
        if spec.addition_embed_type == "text_time":
            pooled = L.input(batch * (spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim),
                             elem)
            return (ctx, pooled)
        return (ctx,)
    d = dit_from_config(den.config)
    out: list[Tensor] = []
    if d.joint_attention_dim:
        out.append(L.input(batch * d.text_len * d.joint_attention_dim, elem))
    if d.pooled_projection_dim:
        out.append(L.input(batch * d.pooled_projection_dim, elem))
    return tuple(out)


def _pipeline_parts(e: VisionEntry) -> tuple[VisionEntry, VisionEntry, VAESpec, list[str]]:
    """A pipeline entry's denoiser, VAE entry, VAE spec and text encoders (catalog names)."""
    cfg = e.config
    vae_e = component(str(cfg["vae"]))
    return (component(str(cfg["denoiser"])), vae_e, vae_from_config(vae_e.config),
            [str(t) for t in cfg.get("text_encoders", ())])


def _pipeline_infer(run: _Run) -> None:
    e, w, res = run.e, run.w, run.res
    den, vae_e, vae, tes = _pipeline_parts(e)
    cfg = e.config
    elem = _infer_elem(w)
    amp = w.precision.is_amp
    cfg_guidance = bool(cfg.get("classifier_free_guidance", True)) and w.guidance
    b = w.batch_size
    b_den = 2 * b if cfg_guidance else b
    # weights of every component, resident for the whole call (pipe.to("cuda"))
    act = 2 if (amp or elem == 2) else 4
    den_L = Layers(Numerics(False, act, elem, amp))
    text = _text_states(den_L, e, b_den, 2 if amp else elem)
    _denoiser(den_L, den, b_den, res, trainable=True, lora=0, ckpt=False, eager=w.eager_attention,
              elem=2 if amp else elem, text=text)
    den_L.end_autocast()
    den_w = sum(block_bytes(n * elem) for n in den_L.tensor_sizes()) + sum(
        block_bytes(n * elem) for n in den_L.buffers.values())
    te_w = sum(_weights_of(t, elem) for t in tes)
    upcast = vae.force_upcast and w.precision is Precision.FP16
    vae_w = _weights_of(str(cfg["vae"]), elem)
    vae_w32 = _weights_of(str(cfg["vae"]), 4)
    run.parameters = e.params
    ws = CUBLAS_WORKSPACE_BYTES
    base = Moment.of({K.WEIGHTS: den_w + te_w + vae_w, K.WORKSPACE: ws})
    # prompt encoding: each text encoder runs on the prompts (and, with guidance, again on the negative prompts)
    lat = res // 8
    te_tapes: list[Layers] = []
    for t in tes:
        te = text_encoder_from_config(component(t).config)
        TL = Layers(Numerics(False, act, elem, amp))
        build_text_encoder(TL, te, b, t + ".")
        run.add(Phase.PREFILL, replay_forward(TL, base).peak)
        te_tapes.append(TL)
    # denoising loop: the conditioning and the latents stay referenced; every step is the same forward
    latents = b * vae.latent_channels * lat * lat * (2 if amp else elem)
    held = Moment.of({K.ACTIVATIONS: latents})
    run.add(Phase.FORWARD, replay_forward(den_L, base + held).peak)
    # VAE decode at full resolution (SDXL's fp16 VAE is upcast to fp32 first: force_upcast)
    dec_elem = 4 if upcast else act
    VL = Layers(Numerics(False, dec_elem, 4 if upcast else elem, amp and not upcast))
    z = VL.input(b * vae.latent_channels * lat * lat, dec_elem)
    img = build_vae_decoder(VL, vae, z, b, lat, lat)
    VL.keep(img)
    dec_base = Moment.of({K.WEIGHTS: den_w + te_w + (vae_w32 if upcast else vae_w), K.WORKSPACE: ws})
    run.add(Phase.DECODE, replay_forward(VL, dec_base).peak)
    vae_sizes = _component_tensors(str(cfg["vae"]))
    weights = [n * elem for t in tes for n in _component_tensors(t)] + \
        [n * elem for n in den_L.tensor_sizes() + list(den_L.buffers.values())] + [n * elem for n in vae_sizes]
    passes = [(tl, 1) for tl in te_tapes] + [(den_L, 2), (VL, 1)]
    to32 = (len(passes) - 1, [(n * elem, n * 4) for n in vae_sizes]) if upcast else None
    run.reserved = simulate(pipeline_events(weights, passes, upcast=to32), DEFAULT_CONF)
    run.weights_loaded = ("the weights loaded in the pipeline's dtype (from_pretrained(torch_dtype=...), "
                          "pipe.to('cuda')), two steps of the denoising loop standing for all")
    run.assumptions.append(f"pipeline: {', '.join(tes) or 'no text encoder'} + {den.name} + {vae_e.name}, all on "
                           f"the GPU; text encoding as prefill, one denoising step as forward (every step of the "
                           f"loop is the same), the VAE decode as decode")
    if cfg_guidance:
        run.assumptions.append("classifier-free guidance: the denoiser runs on 2 x batch (negative + positive prompt)")
    if upcast:
        run.assumptions.append(f"{vae_e.name} has force_upcast: the pipeline converts the VAE to fp32 and decodes in "
                               "fp32 under fp16")
    _attention_note(run)
    run.assumptions.append("safety checker not loaded")


def _pipeline_train(run: _Run) -> None:
    """DreamBooth-style fine-tuning: frozen VAE and text encoders on the GPU, the denoiser trained."""
    e, w, res = run.e, run.w, run.res
    den, _, vae, tes = _pipeline_parts(e)
    cfg = e.config
    lora = w.lora_rank if w.method is VisionMethod.LORA else 0
    num = _numerics(w, True, frozen_base=bool(lora))
    welem = _weight_elem(w)
    act = num.act
    L = Layers(num)
    b = w.batch_size
    lat = res // 8
    if w.cached_latents:
        latent = L.input(b * vae.latent_channels * lat * lat, act)
        text = _text_states(L, e, b, act)
    else:
        # vae.encode(pixels.to(weight_dtype)).latent_dist.sample() * scaling_factor, without gradients
        img = L.input(b * 3 * res * res, welem)
        # the encoder runs on the training tape: nothing in it requires grad, so nothing is saved
        z = build_vae_encoder(L, vae, img, b, res, res)
        latent = L.op(z.numel, act, (z,))
        text_list: list[Tensor] = []
        for i, t in enumerate(tes):
            te = text_encoder_from_config(component(t).config)
            trained_te = w.train_text_encoder and i == 0
            h = build_text_encoder(L, te, b, t + ".", trainable=trained_te, lora_rank=lora if trained_te else 0)
            text_list.append(h)
        text = tuple(text_list) if text_list else _text_states(L, e, b, act)
        if den.kind == "unet" and len(text) < 2 and unet_from_config(den.config).addition_embed_type:
            text = _text_states(L, e, b, act)
    noise = L.op(latent.numel, latent.elem, ())
    noisy = L.op(latent.numel, latent.elem, (latent, noise))
    dd = _denoiser(L, den, b, res, trainable=True, lora=lora, ckpt=w.gradient_checkpointing, eager=w.eager_attention,
                   elem=act, latent=noisy, text=text, targets=w.lora_targets)
    L.end_autocast()
    L.keep(dd.pred)
    loss = L.mse_loss(dd.pred, noise)
    for name in [n for n in L.param_tensors if n.startswith("vae.")]:
        del L.param_tensors[name]  # the encoder ran on the tape; the whole VAE is counted below
    frozen, trained, adapters = _frozen_trained(L)
    run.parameters = e.params
    # frozen helpers are stored in the weight dtype; a LoRA-frozen denoiser base too
    st = model_states(frozen, welem, trained, num.param, amp=num.amp and not lora, training=True,
                      optimizer=w.optimizer, adapters=adapters, adapter_elem=num.lora_param)
    helpers = _weights_of(str(cfg["vae"]), welem)
    if w.cached_latents:
        helpers += sum(_weights_of(t, welem) for t in tes)
    st = replace(st, weights=st.weights + helpers)
    extra = _buffers(L, num.param)
    run.add_training_step(st, train_step(L, st, (loss,), extra, grads_persist=w.grads_persist))
    helper_tensors = list(_component_tensors(str(cfg["vae"]))) + (
        [n for t in tes for n in _component_tensors(t)] if w.cached_latents else [])
    run.reserved = _reserved(L, num.param, (loss,), w, st, frozen_elem=welem,
                             helpers=[n * welem for n in helper_tensors], staged=False)
    run.weights_loaded = ("every model loaded in its dtype (from_pretrained, then .to(device, dtype)), as the "
                          "diffusers training scripts load them")
    how = "cached latents and prompt embeddings" if w.cached_latents else "VAE encode and text encoders every step"
    run.assumptions.append(f"DreamBooth-style fine-tuning of {den.name} ({how}); VAE and frozen text encoders in "
                           f"{'fp32' if welem == 4 else 'the 16-bit compute dtype'} on the GPU")
    if lora:
        run.assumptions.append(_lora_note(w, f"the denoiser's {', '.join(w.lora_targets)}"
                                          + (" and the first text encoder's q_proj, v_proj"
                                             if w.train_text_encoder else "")))
    if w.train_text_encoder and not lora:
        run.assumptions.append(f"the first text encoder ({tes[0] if tes else '-'}) is trained too")
    _attention_note(run)


def _stylegan(run: _Run) -> None:
    """NVlabs stylegan2-ada-pytorch ``training_loop``: Gmain, Greg (every 4), Dmain, Dreg (every 16)."""
    e, w = run.e, run.w
    spec = stylegan_from_config(e.config)
    b = w.batch_size
    res = spec.resolution
    num = Numerics(True, 4, 4, False)

    def g_tape(batch: int, trainable: bool, training: bool) -> tuple[Layers, Tensor]:
        L = Layers(Numerics(training, 4, 4, False))
        z = L.input(batch * spec.z_dim, 4)
        return L, build_generator(L, spec, batch, trainable, z)

    gL, _ = g_tape(1, True, True)
    dL = Layers(num)
    build_discriminator(dL, spec, 1, True, dL.input(3 * res * res, 4))
    g_sizes, d_sizes = gL.tensor_sizes(), dL.tensor_sizes()
    run.parameters = sum(g_sizes) + sum(d_sizes)
    if not w.is_train:
        IL = Layers(Numerics(False, 4, 4, False))
        z = IL.input(b * spec.z_dim, 4)
        build_generator(IL, spec, b, False, z)
        wts = sum(block_bytes(n * 4) for n in g_sizes) + sum(block_bytes(n * 4) for n in gL.buffers.values())
        start = Moment.of({K.WEIGHTS: wts, K.WORKSPACE: CUBLAS_WORKSPACE_BYTES})
        run.add(Phase.FORWARD, replay_forward(IL, start).peak)
        run.assumptions.append("inference: G(z) at the given batch (mapping + synthesis, fp16 top resolutions)")
        return
    g_st = model_states([], 4, g_sizes, 4, amp=False, training=True, optimizer=w.optimizer)
    d_st = model_states([], 4, d_sizes, 4, amp=False, training=True, optimizer=w.optimizer)
    bufs = (sum(block_bytes(n * 4) for n in gL.buffers.values()) * 2
            + sum(block_bytes(n * 4) for n in dL.buffers.values()))
    g_w = sum(block_bytes(n * 4) for n in g_sizes)
    reals = b * 3 * res * res * 4
    base = Moment.of({
        K.WEIGHTS: g_st.weights + g_w + d_st.weights + bufs,  # G, G_ema and D in fp32
        K.GRADIENTS: g_st.gradients + d_st.gradients,  # .grad persists across phases (zero_grad per phase)
        K.OPTIMIZER_STATE: g_st.optimizer_state + d_st.optimizer_state,
        K.WORKSPACE: 2 * CUBLAS_WORKSPACE_BYTES,
        K.ACTIVATIONS: reals + (len(("Gmain", "Greg", "Dmain", "Dreg")) * b * spec.z_dim * 4),
    })
    run.trainable = run.parameters
    run.note_states(g_st)

    def grads_free(st: ModelStates) -> Moment:
        return Moment.of({K.GRADIENTS: -st.gradients})

    # Gmain: G(z) -> D(augment(img)) -> softplus, backward into G (D frozen but on the graph)
    L = Layers(num)
    z = L.input(b * spec.z_dim, 4)
    img = build_generator(L, spec, b, True, z)
    logits = build_discriminator(L, spec, b, False, img)
    loss = L.op(1, 4, (logits,), save=(logits,), kind=K.LOGITS_LOSS)
    L.keep(loss)
    fwd = replay_forward(L, base + grads_free(g_st))
    bpeak, _ = replay_backward(L, fwd, (loss,))
    run.add(Phase.FORWARD, fwd.peak, "Gmain forward")
    run.add(Phase.BACKWARD, bpeak, "Gmain backward")
    # Dmain: G without a graph, then D on the generated and on the real images
    gi, _ = g_tape(b, False, False)
    run.add(Phase.FORWARD, replay_forward(gi, base).peak, "Dmain: G forward without a graph")
    for _src in ("gen", "real"):
        L = Layers(num)
        im = L.input(b * 3 * res * res, 4)
        logits = build_discriminator(L, spec, b, True, im)
        loss = L.op(1, 4, (logits,), save=(logits,), kind=K.LOGITS_LOSS)
        L.keep(loss)
        fwd = replay_forward(L, base + grads_free(d_st))
        bpeak, _ = replay_backward(L, fwd, (loss,))
        run.add(Phase.FORWARD, fwd.peak, f"Dmain forward ({_src} images)")
        run.add(Phase.BACKWARD, bpeak, f"Dmain backward ({_src} images)")
    # Greg (path length, half batch) and Dreg (R1): create_graph gradients, then their backward
    for which in ("G", "D") if spec.version == 2 else ("D",):  # StyleGAN3 configs train without path length
        L = Layers(num)
        if which == "G":
            z = L.input(max(b // 2, 1) * spec.z_dim, 4)
            out = build_generator(L, spec, max(b // 2, 1), True, z)
            start = base + grads_free(g_st)
        else:
            im = L.input(b * 3 * res * res, 4, rg=True)
            out = build_discriminator(L, spec, b, True, im)
            start = base + grads_free(d_st)
        L.keep(out)
        fwd = replay_forward(L, start)
        second = Moment.of({K.ACTIVATIONS: create_graph_bytes(L, (out,))})
        run.add(Phase.BACKWARD, fwd.end + second, "Greg (path length)" if which == "G" else "Dreg (R1)")
    step = base + Moment.of({K.OPTIMIZER_STATE: max(g_st.step_temporaries, d_st.step_temporaries)})
    run.add(Phase.OPTIMIZER_STEP, step)
    if spec.version == 2:
        run.assumptions.append(f"stylegan2-ada-pytorch --cfg=auto on 1 GPU: batch {b}, mapping {spec.mapping_layers} "
                               f"layers, channel_base {spec.channel_base}, fp16 in the {spec.num_fp16_res} highest "
                               f"resolutions, ADA (bgc) augmentation, G_ema; {_gan_optimizer(w)}")
        run.assumptions.append("phases Gmain, Greg (path length every 4), Dmain, Dreg (R1 every 16); the "
                               "regularization passes keep the forward's saved tensors plus every gradient and "
                               "product their create_graph backward computes")
    else:
        run.assumptions.append(f"stylegan3 --cfg=stylegan3-t: batch per GPU {b}, mapping {spec.mapping_layers} layers, "
                               f"channel_base {spec.channel_base}, fp16 layers by sampling rate, ADA augmentation, "
                               f"G_ema; {_gan_optimizer(w)}; phases Gmain, Dmain, Dreg (R1 every 16), no path length")


def _gan_optimizer(w: VisionWorkload) -> str:
    if w.optimizer in (Optimizer.ADAMW, Optimizer.ADAMW_FUSED):
        return f"{w.optimizer.value} states for G and D (NVlabs uses Adam: the same two states per parameter)"
    return f"{w.optimizer.value} for G and D (NVlabs uses Adam)"


# ---- entry point ----------------------------------------------------------------------------------------
def estimate_entry(entry: VisionEntry, w: VisionWorkload) -> Estimate:
    if not entry.estimable:
        raise WorkloadError(f"{entry.name} is a pipeline component ({entry.kind}); estimate a pipeline that uses it")
    kind = entry.kind
    if w.pipeline and kind in ("backbone", "stylegan"):
        raise WorkloadError(f"--pipeline applies to diffusion models; {entry.name} is a {kind}")
    if kind == "stylegan" and w.is_train and w.method is not VisionMethod.FULL:
        raise WorkloadError(f"{entry.name}: only full GAN training (G and D) is modelled; drop --method {w.method}")
    if w.pipeline and kind in ("unet", "dit"):
        if not entry.pipeline:
            raise WorkloadError(f"{entry.name} has no pipeline in the catalog")
        from ._catalog import get_vision_model

        entry = get_vision_model(entry.pipeline)
        kind = "pipeline"
    res = w.resolution or _native_resolution(entry)
    _check_resolution(entry, res)
    run = _Run(entry, w, res)
    if kind == "backbone":
        _backbone(run)
    elif kind in ("unet", "dit"):
        _bare_denoiser(run)
    elif kind == "pipeline":
        if w.is_train:
            _pipeline_train(run)
        else:
            _pipeline_infer(run)
    elif kind == "stylegan":
        if w.precision is not Precision.BF16 and w.is_train:
            run.warnings.append("StyleGAN2-ADA fixes its own precision (fp32 weights, fp16 top resolutions); "
                                "--precision is ignored")
        _stylegan(run)
        # the header and the JSON say what is modelled: NVlabs' own mixed precision, not --precision
        run.assumptions[1] = (f"{res} x {res} pixels, batch {w.batch_size}, fp32 weights and optimizer states, "
                              "fp16 activations in the highest resolutions (num_fp16_res)")
    if w.is_train and not w.set_grads_to_none and kind != "stylegan":
        run.assumptions.append("optimizer.zero_grad(set_to_none=False): zeroed gradients stay allocated through the "
                               "next forward and backward (the default before PyTorch 2.0)")
    if run.top[1]:
        run.assumptions.append(f"the peak is in {run.top[1]}")
    if run.reserved is None:
        run.assumptions.append(f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.3f} GiB and allocator slack "
                               f"{ALLOCATOR_SLACK_FRACTION:.0%} of the peak are added to "
                               "total_bytes, not to peak_allocated_bytes")
    else:
        run.assumptions.append(f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.3f} GiB; reserved memory from a replay of "
                               f"every allocation and free through a model of PyTorch's caching allocator, with "
                               f"{run.weights_loaded}")
    return finish(entry.name, run.phases, parameters=run.parameters, trainable=run.trainable,
                  assumptions=run.assumptions, warnings=run.warnings,
                  workload=workload_dict(w, resolution=res) | ({"precision": "fp32"} if kind == "stylegan" else {}),
                  reserved=run.reserved, guess_reserved=True)

