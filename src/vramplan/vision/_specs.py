"""Typed architecture specs of vision and diffusion models, read from the models' own configurations.

``UNetSpec`` is read from a diffusers ``UNet2DConditionModel`` config.json, ``VAESpec`` from an
``AutoencoderKL`` config, ``TextEncoderSpec`` from a transformers CLIP/T5 text config, ``DiTSpec`` from
the diffusers transformer configs (DiT, PixArt, SD3, Flux); torchvision backbones and StyleGAN networks
are described by their constructor arguments. Field names follow the configs; defaults are the
library's defaults (diffusers 0.42, transformers 5.x, torchvision 0.2x).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = [
    "BackboneSpec", "DiTSpec", "StyleGANSpec", "TextEncoderSpec", "UNetSpec", "VAESpec", "backbone_from_config",
    "dit_from_config", "stylegan_from_config", "text_encoder_from_config", "unet_from_config", "vae_from_config",
]


def _tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, list | tuple) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    raise ConfigError(f"{name} must be an integer or a list of {n} integers, got {value!r}")


def _int(cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class UNetSpec:
    """diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL base and refiner)."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    cross_attention_dim: int
    heads: tuple[int, ...]  # attention heads per level (diffusers' legacy ``attention_head_dim``)
    transformer_layers: tuple[int, ...]
    use_linear_projection: bool
    norm_num_groups: int
    upcast_attention: bool
    addition_embed_type: str | None
    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    sample_size: int  # latent pixels per side at the native resolution
    mid_block: bool = True

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsamples(self) -> int:
        return len(self.block_out_channels) - 1


def unet_from_config(cfg: Mapping[str, Any]) -> UNetSpec:
    """Read a diffusers ``UNet2DConditionModel`` config (as in ``unet/config.json``)."""
    boc = cfg.get("block_out_channels")
    if not isinstance(boc, list | tuple) or not boc:
        raise ConfigError("block_out_channels must be a non-empty list")
    n = len(boc)
    down = tuple(str(t) for t in cfg.get("down_block_types", ()))
    up = tuple(str(t) for t in cfg.get("up_block_types", ()))
    if len(down) != n or len(up) != n:
        raise ConfigError("down_block_types and up_block_types need one entry per block_out_channels")
    for t in down + up:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise ConfigError(f"unsupported UNet block type {t}")
    head_key = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _tuple(cfg.get(head_key, 8), n, head_key)
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise ConfigError(f"unsupported mid_block_type {mid}")
    cad = cfg.get("cross_attention_dim", 1280)
    if not isinstance(cad, int):
        raise ConfigError("cross_attention_dim must be one integer")
    aet = cfg.get("addition_embed_type")
    if aet not in (None, "text_time"):
        raise ConfigError(f"unsupported addition_embed_type {aet}")
    return UNetSpec(
        in_channels=_int(cfg, "in_channels", 4), out_channels=_int(cfg, "out_channels", 4),
        block_out_channels=tuple(int(c) for c in boc),
        layers_per_block=_tuple(cfg.get("layers_per_block", 2), n, "layers_per_block"),
        down_block_types=down, up_block_types=up, cross_attention_dim=cad, heads=heads,
        transformer_layers=_tuple(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        norm_num_groups=_int(cfg, "norm_num_groups", 32), upcast_attention=bool(cfg.get("upcast_attention", False)),
        addition_embed_type=aet, addition_time_embed_dim=int(cfg.get("addition_time_embed_dim") or 0),
        projection_class_embeddings_input_dim=int(cfg.get("projection_class_embeddings_input_dim") or 0),
        sample_size=_int(cfg, "sample_size", 64), mid_block=mid is not None,
    )


@dataclass(frozen=True, slots=True)
class VAESpec:
    """diffusers ``AutoencoderKL`` (Stable Diffusion, SDXL, SD3 and Flux VAEs)."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    use_quant_conv: bool
    use_post_quant_conv: bool
    force_upcast: bool
    sample_size: int

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel."""
        return 1 << (len(self.block_out_channels) - 1)


def vae_from_config(cfg: Mapping[str, Any]) -> VAESpec:
    boc = cfg.get("block_out_channels", [64])
    if not isinstance(boc, list | tuple) or not boc:
        raise ConfigError("block_out_channels must be a non-empty list")
    for t in tuple(cfg.get("down_block_types", ())) + tuple(cfg.get("up_block_types", ())):
        if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise ConfigError(f"unsupported VAE block type {t}")
    return VAESpec(
        in_channels=_int(cfg, "in_channels", 3), out_channels=_int(cfg, "out_channels", 3),
        latent_channels=_int(cfg, "latent_channels", 4), block_out_channels=tuple(int(c) for c in boc),
        layers_per_block=_int(cfg, "layers_per_block", 1), norm_num_groups=_int(cfg, "norm_num_groups", 32),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        force_upcast=bool(cfg.get("force_upcast", True)), sample_size=_int(cfg, "sample_size", 512),
    )


@dataclass(frozen=True, slots=True)
class TextEncoderSpec:
    """A transformers text encoder: CLIP (``CLIPTextModel[WithProjection]``) or T5 (``T5EncoderModel``)."""

    kind: str  # "clip" | "t5"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_length: int  # tokens the pipeline pads the prompt to
    head_dim: int = 64
    projection_dim: int = 0  # CLIPTextModelWithProjection's text_projection (no bias)
    activation: str = "gelu"  # CLIP: quick_gelu (OpenAI) or gelu (OpenCLIP); T5: gated-gelu
    relative_buckets: int = 32


@dataclass(frozen=True, slots=True)
class DiTSpec:
    """A diffusion transformer: DiT / PixArt (``Transformer2DModel``/``PixArtTransformer2DModel``),
    SD3 MMDiT (``SD3Transformer2DModel``) or Flux (``FluxTransformer2DModel``)."""

    kind: str  # "dit" | "pixart" | "sd3" | "flux"
    in_channels: int
    out_channels: int
    patch_size: int
    num_layers: int
    num_single_layers: int
    heads: int
    head_dim: int
    joint_attention_dim: int  # text features (T5: 4096); 0 for class-conditional DiT
    pooled_projection_dim: int
    caption_projection_dim: int
    num_classes: int
    sample_size: int  # latent pixels per side at the native resolution
    pos_embed_max_size: int = 0
    guidance_embeds: bool = False
    text_len: int = 0  # text tokens the pipeline passes (T5 max_sequence_length)
    use_additional_conditions: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: bool = False

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True, slots=True)
class BackboneSpec:
    """A torchvision classification backbone (ResNet, ViT, ConvNeXt)."""

    kind: str  # "resnet" | "vit" | "convnext"
    layers: tuple[int, ...]  # blocks per stage (ResNet, ConvNeXt) or (encoder layers,) for ViT
    widths: tuple[int, ...] = ()  # ConvNeXt stage widths
    bottleneck: bool = True  # ResNet: Bottleneck (50+) or BasicBlock (18/34)
    patch_size: int = 16
    hidden_dim: int = 768
    heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    num_classes: int = 1000


@dataclass(frozen=True, slots=True)
class StyleGANSpec:
    """NVlabs StyleGAN2-ADA / StyleGAN3 generator and discriminator (``training/networks*.py``)."""

    version: int  # 2 or 3
    resolution: int
    channel_base: int = 32768
    channel_max: int = 512
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    num_fp16_res: int = 4
    mbstd_group_size: int = 4
    img_channels: int = 3
    cfg3: str = "t"  # StyleGAN3 config: "t" (translation) or "r" (rotation)


def text_encoder_from_config(cfg: Mapping[str, Any]) -> TextEncoderSpec:
    """A transformers ``CLIPTextConfig`` or ``T5Config`` (encoder only), with the pipeline's ``max_length``."""
    mt = cfg.get("model_type")
    if mt == "t5":
        return TextEncoderSpec(kind="t5", hidden_size=_int(cfg, "d_model"), intermediate_size=_int(cfg, "d_ff"),
                               num_layers=_int(cfg, "num_layers"), num_heads=_int(cfg, "num_heads"),
                               vocab_size=_int(cfg, "vocab_size"), max_length=_int(cfg, "max_length", 512),
                               head_dim=_int(cfg, "d_kv", 64), activation="gated-gelu",
                               relative_buckets=_int(cfg, "relative_attention_num_buckets", 32))
    if mt in ("clip_text_model", "clip"):
        hidden, heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
        return TextEncoderSpec(kind="clip", hidden_size=hidden, intermediate_size=_int(cfg, "intermediate_size"),
                               num_layers=_int(cfg, "num_hidden_layers"), num_heads=heads,
                               vocab_size=_int(cfg, "vocab_size"), max_length=_int(cfg, "max_length", 77),
                               head_dim=hidden // heads,
                               projection_dim=_int(cfg, "projection_dim") if cfg.get("with_projection") else 0,
                               activation=str(cfg.get("hidden_act", "quick_gelu")))
    raise ConfigError(f"unsupported text encoder model_type {mt!r}")


def dit_from_config(cfg: Mapping[str, Any]) -> DiTSpec:
    """A diffusers transformer config: DiT (``Transformer2DModel``), PixArt, SD3 or Flux."""
    cls = cfg.get("_class_name")
    heads, hd = _int(cfg, "num_attention_heads"), _int(cfg, "attention_head_dim")
    layers = _int(cfg, "num_layers")
    if cls == "Transformer2DModel":
        if cfg.get("norm_type") != "ada_norm_zero" or not cfg.get("patch_size"):
            raise ConfigError("Transformer2DModel: only the patched ada_norm_zero (DiT) variant is supported")
        cin = _int(cfg, "in_channels")
        return DiTSpec("dit", cin, int(cfg.get("out_channels") or cin), _int(cfg, "patch_size"), layers, 0, heads, hd,
                       0, 0, 0, _int(cfg, "num_embeds_ada_norm", 1000), _int(cfg, "sample_size"))
    if cls == "PixArtTransformer2DModel":
        cin = _int(cfg, "in_channels")
        sample = _int(cfg, "sample_size")
        extra = cfg.get("use_additional_conditions")
        return DiTSpec("pixart", cin, int(cfg.get("out_channels") or cin), _int(cfg, "patch_size"), layers, 0, heads,
                       hd, _int(cfg, "caption_channels"), 0, 0, 0, sample, text_len=_int(cfg, "text_len", 120),
                       use_additional_conditions=bool(extra) if extra is not None else sample == 128)
    if cls == "SD3Transformer2DModel":
        cin = _int(cfg, "in_channels")
        return DiTSpec("sd3", cin, int(cfg.get("out_channels") or cin), _int(cfg, "patch_size"), layers, 0, heads, hd,
                       _int(cfg, "joint_attention_dim"), _int(cfg, "pooled_projection_dim"),
                       _int(cfg, "caption_projection_dim"), 0, _int(cfg, "sample_size"),
                       pos_embed_max_size=_int(cfg, "pos_embed_max_size", 96), text_len=_int(cfg, "text_len", 333),
                       qk_norm=cfg.get("qk_norm") is not None,
                       dual_attention_layers=tuple(int(i) for i in cfg.get("dual_attention_layers", ()) or ()))
    if cls == "FluxTransformer2DModel":
        cin = _int(cfg, "in_channels", 64)
        if cin % 4 or int(cfg.get("patch_size", 1)) != 1:
            raise ConfigError("FluxTransformer2DModel: in_channels must be 4 x the latent channels, patch_size 1")
        # the pipeline packs 2 x 2 latent pixels into one token (in_channels = 4 x 16)
        return DiTSpec("flux", cin, int(cfg.get("out_channels") or cin) // 4, 2, layers,
                       _int(cfg, "num_single_layers"), heads, hd, _int(cfg, "joint_attention_dim"),
                       _int(cfg, "pooled_projection_dim"), 0, 0, 128, guidance_embeds=bool(cfg.get("guidance_embeds")),
                       text_len=_int(cfg, "text_len", 512), qk_norm=True)
    raise ConfigError(f"unsupported transformer class {cls!r}")


def backbone_from_config(cfg: Mapping[str, Any]) -> BackboneSpec:
    kind = cfg.get("kind")
    layers = tuple(int(v) for v in cfg.get("layers", ()))
    if kind == "resnet":
        return BackboneSpec("resnet", layers, bottleneck=bool(cfg.get("bottleneck", True)))
    if kind == "vit":
        return BackboneSpec("vit", layers, patch_size=_int(cfg, "patch_size"), hidden_dim=_int(cfg, "hidden_dim"),
                            heads=_int(cfg, "heads"), mlp_dim=_int(cfg, "mlp_dim"),
                            image_size=_int(cfg, "image_size", 224))
    if kind == "convnext":
        return BackboneSpec("convnext", layers, widths=tuple(int(v) for v in cfg.get("widths", ())))
    raise ConfigError(f"unsupported backbone kind {kind!r}")


def stylegan_from_config(cfg: Mapping[str, Any]) -> StyleGANSpec:
    return StyleGANSpec(version=_int(cfg, "version", 2), resolution=_int(cfg, "resolution"),
                        channel_base=_int(cfg, "channel_base", 32768), channel_max=_int(cfg, "channel_max", 512),
                        mapping_layers=_int(cfg, "mapping_layers", 8), num_fp16_res=int(cfg.get("num_fp16_res", 4)),
                        mbstd_group_size=int(cfg.get("mbstd_group_size", 4)), cfg3=str(cfg.get("cfg3", "t")))
