"""Image models through the trace: a torchvision backbone or a diffusers UNet built on fake tensors and run through
the calibration harness's own loops (``measure.py`` ``run_vision`` and ``run_unet``) under the
:class:`~._tracker.MemoryTracker`, with the language trace's CUDA emulation (autocast policies, SDPA kernel
choice, 512-byte blocks, cuBLAS workspaces) and its caching-allocator replay.

What runs, as the harness runs it on the GPU:

* backbones: ``torchvision.models.<name>(weights=None)`` built in fp32 (``model.to(bfloat16)`` for bf16), AdamW,
  ``cross_entropy(model(x).float(), y)`` (under autocast for AMP), ``backward()``, ``step()``,
  ``zero_grad(set_to_none=True)``; inference is one forward under ``torch.inference_mode()``.
* UNets: ``UNet2DConditionModel`` from the catalog's config built in fp32 and cast with ``model.to(dtype)``,
  random latents at resolution / 8, 77 text states of ``cross_attention_dim`` (SDXL's pooled text embeddings and
  time ids where ``addition_embed_type`` is ``text_time``), ``mse_loss(pred.float(), latents.float())``, AdamW,
  the prediction kept until after the step; inference is one denoising forward.

* UNet pipelines (sd15, sd21, sdxl, sdxl-refiner) at inference: diffusers' text-to-image call, every component on
  the GPU in the pipeline's dtype: CLIP text encoding, two denoising steps at the guidance-doubled batch, the VAE
  decode at full resolution (``_run_pipeline``).

* diffusion transformers (DiT ``Transformer2DModel``, PixArt, SD3, Flux) through ``run_unet``'s loop, with the
  estimate's input shapes (``vision._specs.dit_from_config``: ``text_len`` text states, Flux's packed latents).
* ``--method lora`` on a denoiser: diffusers' LoRA scripts' setup (``add_adapter``).

Refused (one line): pipeline training, pipelines around diffusion transformers, StyleGAN, pipeline components, LoRA
on backbones, and options the harness loops do not have.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .._engine.step import workload_dict
from ..errors import VramplanError
from ..kinds import MemoryKind, Phase
from ..result import Estimate
from ..vision._catalog import VisionEntry
from ..vision._workload import VisionMethod, VisionWorkload
from ..workload import Precision
from ._build import compute_dtype, make_optimizer, param_dtype
from ._cuda import (
    AutocastEmulation,
    attention_backward_transient,
    cuda_dropout,
    cuda_sdpa,
    register_cuda_kernels,
    safe_softmax_transient,
)
from ._engine import _ATTN_BWD, _Recorder, _scalar_answer, finish_estimate
from ._engine import _trace_environment as _environment
from ._loops import create_optimizer_state, traced_backward, traced_step
from ._tracker import MemoryTracker, gradient_buffers
from ._vision_refusal import IMAGE_TRACE_MISSING, vision_refusal

__all__ = ["run_vision_trace"]

aten = torch.ops.aten
_TEXT_TOKENS = 77  # CLIP's context length: the text states measure.py's run_unet feeds the UNet


def _import_torchvision(notes: list[str]) -> Any:
    """torchvision; where its compiled operators do not load against the installed torch (a CUDA torchvision wheel
    beside a CPU torch build: ``torchvision::nms does not exist`` at import), it is imported without registering
    their fake kernels (``torchvision/_meta_registrations.py``), which only the detection operators (nms,
    roi_align, deform_conv2d) use; the classification backbones call none of them."""
    import sys
    import types

    try:
        import torchvision
    except ImportError:
        raise VramplanError(IMAGE_TRACE_MISSING) from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
        notes.append(f"torchvision {torchvision.__version__}'s compiled operators do not load against torch "
                     f"{torch.__version__} ({exc}); imported without their fake kernels (detection ops only)")
    return torchvision


def _builder(entry: VisionEntry, notes: list[str]) -> Any:
    torchvision = _import_torchvision(notes)
    fn_name = entry.name.replace("-", "_")
    fn = getattr(torchvision.models, fn_name, None)
    if fn is None or not callable(fn):
        raise VramplanError(f"{entry.name}: torchvision {torchvision.__version__} has no builder {fn_name}")
    return fn


def _unet_class(notes: list[str]) -> Any:
    # transformers, which diffusers imports, imports torchvision where it is installed
    with contextlib.suppress(VramplanError):
        _import_torchvision(notes)
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise VramplanError(IMAGE_TRACE_MISSING) from None
    return UNet2DConditionModel


@contextlib.contextmanager
def _no_value_init() -> Iterator[None]:
    """``nn.init.trunc_normal_`` reads a value back on some torch versions; fake weights have no values to set."""
    init = nn.init
    old = init.trunc_normal_
    init.trunc_normal_ = lambda tensor, *a, **k: tensor  # type: ignore[assignment]
    try:
        yield
    finally:
        init.trunc_normal_ = old  # type: ignore[assignment]


def _build(entry: VisionEntry, w: VisionWorkload, res: int, notes: list[str]) -> nn.Module:
    """The model in fp32, as the harness builds it (the cast to a 16-bit dtype follows, tracked)."""
    if entry.kind == "backbone":
        fn = _builder(entry, notes)
        kw: dict[str, Any] = {"weights": None}
        if entry.config.get("kind") == "vit" and res != int(entry.config.get("image_size", 224)):
            kw["image_size"] = res
        with _no_value_init():
            model: nn.Module = fn(**kw)
        notes.append(f"torchvision.models.{fn.__name__}(weights=None)"
                     + (f", image_size={res}" if "image_size" in kw else ""))
        return model
    cls = _unet_class(notes)
    import diffusers

    if entry.kind == "dit":
        cls_name = str(entry.config.get("_class_name"))
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise VramplanError(f"{entry.name}: diffusers {diffusers.__version__} has no {cls_name}")
    own = ("text_len", "class_conditional")  # the catalog's own fields, not the class's
    cfg = {k: v for k, v in entry.config.items() if not k.startswith("_") and k not in own}
    with _no_value_init():
        model = cls.from_config(cfg)
    notes.append(f"diffusers {diffusers.__version__} {cls.__name__}.from_config(the catalog's config)")
    return model


def _text_encoder(entry: VisionEntry, dtype: torch.dtype) -> nn.Module:
    """A pipeline's CLIP text encoder from the catalog's transformers config (``with_projection``: the
    ``CLIPTextModelWithProjection`` SDXL's second encoder is), SDPA attention as ``from_pretrained`` picks it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = dict(entry.config)
    proj = bool(c.pop("with_projection", False))
    for k in ("model_type", "max_length"):
        c.pop(k, None)
    cls = CLIPTextModelWithProjection if proj else CLIPTextModel
    return cls._from_config(CLIPTextConfig(**c), attn_implementation="sdpa", dtype=dtype)  # type: ignore[no-any-return]


def _run_pipeline(entry: VisionEntry, w: VisionWorkload, res: int) -> Estimate:
    """A diffusers text-to-image call (StableDiffusion(XL)Pipeline ``__call__`` under ``torch.no_grad()``), every
    component on the GPU in the pipeline's dtype: the prompts (and, with classifier-free guidance, the negative
    prompts) through each CLIP text encoder, two steps of the denoising loop (UNet on the doubled batch, the guidance
    combination, the scheduler's new latents) standing for all, then ``vae.decode`` at full resolution (SDXL's VAE,
    ``force_upcast``, converted to fp32 first under fp16)."""
    from ..vision._catalog import component
    from . import report

    t0 = time.perf_counter()
    cfg = entry.config
    den_e, vae_e = component(str(cfg["denoiser"])), component(str(cfg["vae"]))
    te_es = [component(str(t)) for t in cfg.get("text_encoders", ())]
    dtype = param_dtype(w.precision)
    guidance = bool(cfg.get("classifier_free_guidance", True)) and w.guidance
    b = w.batch_size
    notes: list[str] = [
        f"traced the real model code on fake tensors: torch {torch.__version__}; CUDA kernel choices emulated on "
        "the CPU trace",
        "CUDA caching allocator: every allocation rounded up to 512-byte blocks",
        f"{res} x {res} pixels, batch {b}, {w.precision.value}",
    ]
    _unet_class(notes)  # torchvision first, where installed (transformers imports it)
    from diffusers import AutoencoderKL

    autocast = AutocastEmulation(compute_dtype(w.precision)) if w.precision.is_amp else None
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = _new_tracker()
    report("building the pipeline on fake tensors")
    with _environment(), register_cuda_kernels(autocast, _sdpa), fake:
        unet = _build(den_e, w, res, notes).to(dtype).eval()
        tes = [_text_encoder(t, dtype).eval() for t in te_es]
        vae_cfg = {k: v for k, v in vae_e.config.items() if not k.startswith("_")}
        with _no_value_init():
            vae = AutoencoderKL.from_config(vae_cfg).to(dtype).eval()
    notes.append(f"pipeline: {', '.join(t.name for t in te_es) or 'no text encoder'} + {den_e.name} + {vae_e.name}, "
                 f"all on the GPU in {dtype} (from_pretrained(torch_dtype=...), pipe.to('cuda'))")
    models: list[nn.Module] = [*tes, unet, vae]
    total = sum(p.numel() for m in models for p in m.parameters())
    with _environment(), register_cuda_kernels(autocast, _sdpa), fake, tracker, torch.no_grad():
        for m in models:  # loaded in the pipeline's order: text encoders, denoiser, VAE
            for t in (*m.parameters(), *m.buffers()):
                tracker.adopt(t, MemoryKind.WEIGHTS)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast is not None else contextlib.nullcontext()
        with _Recorder(tracker, unet, None), ctx:
            _pipeline_call(tracker, tes, unet, vae, b, res, dtype, guidance, w, notes)
    if guidance:
        notes.append("classifier-free guidance: the denoiser runs on 2 x batch (negative + positive prompt)")
    notes.append("text encoding as prefill, one denoising step as forward (two traced, every step of the loop is the "
                 "same), the VAE decode as decode; safety checker not loaded")
    notes.append("cuDNN convolution workspaces are not traced (the CPU trace runs no cuDNN)")
    return finish_estimate(tracker, name=entry.name, workspaces=1, alloc_conf=None, parameters=total, trainable=0,
                           assumptions=notes, warns=(), workload=workload_dict(w, resolution=res), t0=t0)


def _pipeline_call(tracker: MemoryTracker, tes: list[nn.Module], unet: nn.Module, vae: nn.Module, b: int, res: int,
                   dtype: torch.dtype, guidance: bool, w: VisionWorkload, notes: list[str]) -> None:
    ucfg = unet.config  # type: ignore[attr-defined]
    sdxl = ucfg.addition_embed_type == "text_time"
    tracker.set_phase(Phase.PREFILL)
    tracker.region = MemoryKind.ACTIVATIONS
    halves: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for _ in range(2 if guidance else 1):  # negative prompts, then the prompts (encode_prompt)
        states: list[torch.Tensor] = []
        pooled = None
        for te in tes:
            ids = torch.zeros(b, _TEXT_TOKENS, dtype=torch.long)
            out = te(ids, output_hidden_states=sdxl)
            # SD 1.x/2.x: the last hidden state; SDXL: the penultimate layer's, and the second encoder's pooled output
            states.append(out.hidden_states[-2] if sdxl else out[0])
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
            del out, ids
        halves.append((torch.cat(states, dim=-1) if len(states) > 1 else states[0], pooled))
        del states
    emb = torch.cat([h[0] for h in halves]) if guidance else halves[0][0]
    kw: dict[str, Any] = {"encoder_hidden_states": emb}
    if sdxl:
        pooled_all = [h[1] for h in halves]
        if any(p is None for p in pooled_all):
            raise VramplanError("an SDXL-style UNet needs a text encoder with a projection (pooled embeddings)")
        text_embeds = torch.cat(pooled_all)  # type: ignore[arg-type]
        # SDXL base: 6 micro-conditioning ids (sizes, crop); the refiner: 5 (sizes, crop, aesthetic score)
        n_ids = (int(ucfg.projection_class_embeddings_input_dim) - text_embeds.shape[-1]) // int(
            ucfg.addition_time_embed_dim)
        kw["added_cond_kwargs"] = {"text_embeds": text_embeds,
                                   "time_ids": torch.zeros(emb.shape[0], n_ids, dtype=dtype)}
    del halves
    tracker.set_phase(Phase.FORWARD)
    lat = res // 8
    latents = torch.randn(b, int(ucfg.in_channels), lat, lat, dtype=dtype)
    t = torch.tensor(999)
    for _ in range(2):
        inp = torch.cat([latents] * 2) if guidance else latents
        noise = unet(inp, t, **kw).sample
        if guidance:
            uncond, text = noise.chunk(2)
            noise = uncond + 7.5 * (text - uncond)
            del uncond, text
        latents = latents - 0.02 * noise  # the scheduler's step returns new latents (prev_sample)
        del inp, noise
    del kw, emb
    tracker.set_phase(Phase.DECODE)
    vcfg = vae.config  # type: ignore[attr-defined]
    if getattr(vcfg, "force_upcast", False) and dtype == torch.float16:
        vae.to(torch.float32)
        tracker.mark(vae.parameters(), MemoryKind.WEIGHTS)
        latents = latents.to(torch.float32)
        notes.append("the VAE has force_upcast: converted to fp32 and decoded in fp32 under fp16")
    image = vae.decode(latents / float(vcfg.scaling_factor), return_dict=False)[0]  # type: ignore[operator]
    del latents, image
    tracker.set_phase(None)


def _dit_inputs(model: nn.Module, entry: VisionEntry, b: int, res: int,
                dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A diffusion transformer's forward inputs at the estimate's shapes (``vision._specs.dit_from_config``): latents
    (Flux: 2 x 2 latent pixels packed into one token), ``text_len`` text states of the joint/caption width, the pooled
    projection, timesteps (DiT: class labels; PixArt at 1024 px: resolution and aspect-ratio conditions)."""
    cfg = model.config  # type: ignore[attr-defined]
    cls = str(entry.config.get("_class_name"))
    lat = res // 8
    t = torch.randint(0, 1000, (b,))
    if cls == "FluxTransformer2DModel":
        n = (lat // 2) ** 2
        tl = int(entry.config.get("text_len", 512))
        kw: dict[str, Any] = {
            "encoder_hidden_states": torch.randn(b, tl, int(cfg.joint_attention_dim), dtype=dtype),
            "pooled_projections": torch.randn(b, int(cfg.pooled_projection_dim), dtype=dtype),
            "timestep": t.to(dtype), "img_ids": torch.zeros(n, 3), "txt_ids": torch.zeros(tl, 3)}
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((b,), 3.5)
        return (torch.randn(b, n, int(cfg.in_channels), dtype=dtype),), kw
    x = torch.randn(b, int(cfg.in_channels), lat, lat, dtype=dtype)
    if cls == "Transformer2DModel":
        kw = {"timestep": t, "class_labels": torch.randint(0, 1000, (b,))}
    elif cls == "PixArtTransformer2DModel":
        kw = {"encoder_hidden_states": torch.randn(b, int(entry.config.get("text_len", 120)),
                                                   int(cfg.caption_channels), dtype=dtype),
              "timestep": t, "added_cond_kwargs": {"resolution": torch.randn(b, 2, dtype=dtype),
                                                   "aspect_ratio": torch.randn(b, 1, dtype=dtype)}}
    elif cls == "SD3Transformer2DModel":
        kw = {"encoder_hidden_states": torch.randn(b, int(entry.config.get("text_len", 333)),
                                                   int(cfg.joint_attention_dim), dtype=dtype),
              "pooled_projections": torch.randn(b, int(cfg.pooled_projection_dim), dtype=dtype), "timestep": t}
    else:
        raise VramplanError(f"{entry.name}: {cls} is not traced")
    return (x,), kw


def _unet_inputs(model: nn.Module, b: int, res: int, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    cfg = model.config  # type: ignore[attr-defined]
    lat = res // 8
    x = torch.randn(b, int(cfg.in_channels), lat, lat, dtype=dtype)
    cross = cfg.cross_attention_dim
    cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
    ctx = torch.randn(b, _TEXT_TOKENS, cross, dtype=dtype)
    t = torch.randint(0, 1000, (b,))
    kw: dict[str, Any] = {"encoder_hidden_states": ctx}
    if cfg.addition_embed_type == "text_time":
        n_ids = 6  # SDXL's micro-conditioning: original size, crop top-left, target size
        pooled = int(cfg.projection_class_embeddings_input_dim) - n_ids * int(cfg.addition_time_embed_dim)
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, pooled, dtype=dtype),
                                   "time_ids": torch.randn(b, n_ids, dtype=dtype)}
    elif cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
        raise VramplanError(f"UNet with addition_embed_type={cfg.addition_embed_type!r}, class_embed_type="
                            f"{cfg.class_embed_type!r}: its extra conditioning inputs are not traced")
    return (x, t), kw


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    return cuda_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def _new_tracker() -> MemoryTracker:
    """A tracker with the language trace's CUDA kernels: SDPA's backend choice, fused dropout, the attention
    backward's and ``_safe_softmax``'s transients."""
    tracker = MemoryTracker()
    tracker.scalar_answer = _scalar_answer
    tracker.overrides[aten.scaled_dot_product_attention.default] = _sdpa
    tracker.overrides[aten.dropout.default] = cuda_dropout
    for f in _ATTN_BWD:
        tracker.after_op[f] = lambda a, k, o, f=f: attention_backward_transient(f, a)
    tracker.after_op[aten._safe_softmax.default] = lambda a, k, o: safe_softmax_transient(a)
    return tracker


def run_vision_trace(entry: VisionEntry, w: VisionWorkload, res: int) -> Estimate:
    why = vision_refusal(entry, w)
    if why is not None:
        raise VramplanError(why)
    loggers = []
    for lib in ("diffusers", "transformers"):
        try:
            logging = __import__(f"{lib}.utils.logging", fromlist=["get_verbosity"])
        except ImportError:
            continue
        loggers.append((logging, logging.get_verbosity()))
        logging.set_verbosity_error()  # diffusers' "cast with to()" notice is about real weights, not the user's
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _run_pipeline(entry, w, res) if entry.kind == "pipeline" else _run(entry, w, res)
    finally:
        for logging, level in loggers:
            logging.set_verbosity(level)


def _run(entry: VisionEntry, w: VisionWorkload, res: int) -> Estimate:
    from . import report

    t0 = time.perf_counter()
    train = w.is_train
    unet = entry.kind in ("unet", "dit")  # a diffusers denoiser (measure.py's run_unet loop)
    dtype = param_dtype(w.precision)
    notes: list[str] = [
        f"traced the real model code on fake tensors: torch {torch.__version__}; CUDA kernel choices emulated on "
        "the CPU trace",
        "CUDA caching allocator: every allocation rounded up to 512-byte blocks",
        f"{res} x {res} pixels, batch {w.batch_size}, {w.precision.value}",
    ]
    autocast = AutocastEmulation(compute_dtype(w.precision)) if w.precision.is_amp else None
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = _new_tracker()
    sdpa = _sdpa
    workspaces = 2 if train else 1
    prev_default = torch.get_default_dtype()
    report("building the model on fake tensors")
    with _environment(), register_cuda_kernels(autocast, sdpa), fake, tracker, gradient_buffers(tracker):
        # built under the tracker, in fp32, then cast: the freed fp32 blocks stay in the allocator's cache, as they do
        # in the harness (what max_memory_reserved sees)
        model = _build(entry, w, res, notes)
        torch.set_default_dtype(prev_default)
        lora = train and w.method is VisionMethod.LORA
        if lora:
            # diffusers' train_text_to_image_lora.py: the frozen base in weight_dtype (the 16-bit compute dtype
            # under mixed precision), then unet.add_adapter(LoraConfig(...)); fp16 casts the adapters to fp32
            dtype = torch.float32 if w.precision is Precision.FP32 else compute_dtype(w.precision)
            model.requires_grad_(False)
        if dtype != torch.float32:
            model.to(dtype)
            notes.append(f"weights built in fp32 and cast with model.to({dtype}) (the calibration harness)")
        if lora:
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=w.lora_rank, lora_alpha=w.lora_rank,  # type: ignore[operator]
                                         init_lora_weights="gaussian", target_modules=list(w.lora_targets)))
            if w.precision is Precision.AMP_FP16:
                cast_training_params(model, dtype=torch.float32)
            adapter_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
            notes.append(f"LoRA r={w.lora_rank} on {', '.join(w.lora_targets)} (diffusers add_adapter, peft): "
                         f"base frozen in {dtype}, adapters in {', '.join(adapter_dtypes)}")
        if unet and w.gradient_checkpointing and train:
            model.enable_gradient_checkpointing()  # type: ignore[operator]
            notes.append("gradient checkpointing: diffusers enable_gradient_checkpointing()")
        if unet and w.eager_attention:
            from diffusers.models.attention_processor import AttnProcessor

            model.set_attn_processor(AttnProcessor())  # type: ignore[operator]
            notes.append("attention: diffusers AttnProcessor (eager: scores materialized)")
        model.train(train)
        tracker.mark(model.parameters(), MemoryKind.WEIGHTS)
        tracker.mark(model.buffers(), MemoryKind.WEIGHTS)
        # the model's own parameters (LoRA adapters are counted as trainable, not here: estimate_vision's convention)
        total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
        params = [p for p in model.parameters() if p.requires_grad]
        in_dtype = dtype if w.precision in (Precision.BF16, Precision.FP16) else torch.float32
        b = w.batch_size
        if unet:
            args, kw = (_unet_inputs(model, b, res, dtype) if entry.kind == "unet"
                        else _dit_inputs(model, entry, b, res, dtype))
            target = args[0]
        else:
            args, kw = (torch.randn(b, 3, res, res, dtype=in_dtype),), {}
            target = torch.randint(0, 1000, (b,))
        opt = None
        if train:
            opt, opt_note = make_optimizer(params, w.optimizer)
            notes.append(f"optimizer: {opt_note}, zero_grad(set_to_none=True)")
        recorder = _Recorder(tracker, model, None)
        with recorder:
            if train:
                assert opt is not None
                _train_step(model, opt, params, tracker, autocast, args, kw, target, unet)
            else:
                _infer_step(model, tracker, autocast, args, kw)
    if entry.params and total != entry.params:
        notes.append(f"the built model has {total:,} parameters; the catalog says {entry.params:,}")
    if autocast is not None:
        notes.append(f"AMP: CUDA autocast policies emulated on the CPU autocast key ({autocast.lower})")
    notes.append(f"cuBLAS workspace: {workspaces} handle(s) x 32 MiB inside the allocator")
    notes.append("cuDNN convolution workspaces are not traced (the CPU trace runs no cuDNN)")
    if train:
        notes.append("training step as measure.py runs it: " + (
            "MSE of the prediction against the latents, backward, AdamW step, the prediction kept until after the "
            "step" if unet else "cross_entropy(model(x).float(), y), backward, optimizer.step()"))
    else:
        notes.append("inference: one forward under torch.inference_mode()"
                     + (" (one denoising step, no classifier-free guidance doubling)" if unet else ""))
    return finish_estimate(
        tracker, name=entry.name, workspaces=workspaces, alloc_conf=None, parameters=total,
        trainable=sum(p.numel() for p in params) if train else 0, assumptions=notes, warns=(),
        workload=workload_dict(w, resolution=res), t0=t0)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], tracker: MemoryTracker,
                autocast: AutocastEmulation | None, args: tuple[Any, ...], kw: dict[str, Any], target: torch.Tensor,
                unet: bool) -> None:
    """One steady-state step of measure.py's loop (the optimizer state created first, untracked, as the language
    trace does: ``_loops.create_optimizer_state``)."""
    import torch.nn.functional as F

    create_optimizer_state(opt, params, tracker)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast is not None else contextlib.nullcontext()
    tracker.set_phase(Phase.FORWARD)
    tracker.region = MemoryKind.ACTIVATIONS
    pred: Any = None
    with ctx:
        if unet:
            pred = model(*args, **kw).sample
        else:
            loss = F.cross_entropy(model(*args).float(), target)
    tracker.region = MemoryKind.LOGITS_LOSS
    if unet:
        # a learned-variance DiT predicts noise and variance (2 x the channels): the noise half meets the target
        noise = pred if pred.shape == target.shape else pred.narrow(1, 0, target.shape[1])
        loss = F.mse_loss(noise.float(), target.float())
        del noise
    traced_backward(loss, params, tracker)
    traced_step(opt, params, tracker)
    del pred, loss
    tracker.set_phase(None)


def _infer_step(model: nn.Module, tracker: MemoryTracker, autocast: AutocastEmulation | None,
                args: tuple[Any, ...], kw: dict[str, Any]) -> None:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        tracker.set_phase(Phase.FORWARD)
        tracker.region = MemoryKind.ACTIVATIONS
        out = model(*args, **kw)
        del out
    tracker.set_phase(None)
