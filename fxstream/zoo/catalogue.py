"""The zoo's catalogue: real architectures from torchvision, timm and Hugging Face transformers.

Every entry builds its model with random weights in eval mode, at small
sizes (few classes, the smallest input the architecture accepts, tiny
transformer configs) and returns it with example inputs. The libraries are
optional: each source is imported only when its entries are built, and a
missing one leaves its part of the catalogue empty (:func:`available`).

    from fxstream.zoo.catalogue import catalogue
    for entry in catalogue():
        model, inputs = entry.build()
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

SOURCES = ("torchvision", "timm", "transformers")
NUM_CLASSES = 10
VOCAB = 99


@dataclass(frozen=True)
class Built:
    """A built model and the inputs of one call."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. the input size chosen
    output: str | int | None = None  # the output to predict, where not the first (fxstream.streamline's output=)

    def to(self, dtype: torch.dtype) -> Built:
        """The model and its floating-point inputs in ``dtype`` (integer inputs such as token ids unchanged)."""
        cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        return Built(self.model.to(dtype), tuple(cast(a) for a in self.args),
                     {k: cast(v) for k, v in self.kwargs.items()}, self.note, self.output)


@dataclass(frozen=True)
class Entry:
    """One catalogued model: ``build()`` makes it (random weights, eval mode) with its inputs."""

    name: str
    source: str
    make: Callable[[], Built]
    family: str = ""

    def build(self) -> Built:
        torch.manual_seed(0)
        with quiet():
            built = self.make()
        built.model.eval()
        return built


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' warnings about random init, deprecated arguments and the like."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def available(source: str) -> bool:
    """Whether the library of ``source`` is installed."""
    return importlib.util.find_spec(source) is not None


def catalogue(sources: tuple[str, ...] = SOURCES) -> list[Entry]:
    """Every entry of the given sources whose library is installed."""
    builders = {"torchvision": torchvision_entries, "timm": timm_entries, "transformers": transformers_entries}
    return [entry for source in sources if available(source) for entry in builders[source]()]


def _import_vision(name: str):
    from .._compat import make_torchvision_importable

    make_torchvision_importable()
    return importlib.import_module(name)


def _image(size: int | tuple[int, int], batch: int = 1, channels: int = 3) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, channels, h, w)


def _smallest(make_model: Callable[[int], torch.nn.Module], sizes: tuple[int, ...], batch: int = 1) -> Built:
    """The model at the first input size of ``sizes`` its forward accepts (tried in order)."""
    errors = []
    for size in sizes:
        try:
            model = make_model(size).eval()
            x = _image(size, batch)
            with torch.no_grad():
                model(x)
            return Built(model, (x,), note=f"{size}x{size}")
        except Exception as error:  # noqa: BLE001 - the next size is tried
            errors.append(f"{size}: {str(error).splitlines()[0][:80] if str(error) else type(error).__name__}")
    raise RuntimeError(f"no input size works ({'; '.join(errors)})")


# torchvision ------------------------------------------------------------------------------------------------

# The smallest input size per architecture; others start at 32 and grow until the forward runs.
_TV_SIZES = {"inception_v3": (75, 96, 128), "maxvit_t": (224,), "alexnet": (63, 64, 96, 128, 224)}
# ViTs take image_size= (a whole number of patches; 2x2 patches plus the class token).
_TV_KWARGS = {"vit_b_16": 32, "vit_b_32": 64, "vit_l_16": 32, "vit_l_32": 64, "vit_h_14": 28}


def torchvision_entries() -> list[Entry]:
    """Every image classification builder torchvision lists, with ``NUM_CLASSES`` classes."""
    if not available("torchvision"):
        return []
    torchvision = _import_vision("torchvision")
    return [Entry(f"torchvision/{name}", "torchvision", _tv_maker(name), family=name.rstrip("0123456789_bx"))
            for name in torchvision.models.list_models(module=torchvision.models)]


def _tv_maker(name: str) -> Callable[[], Built]:
    def make() -> Built:
        torchvision = _import_vision("torchvision")

        def build(size: int) -> torch.nn.Module:
            kwargs = {"image_size": size} if name in _TV_KWARGS else {}
            return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)

        if name in _TV_KWARGS:
            return _smallest(build, (_TV_KWARGS[name],))
        # The model is built once; only the input size is searched.
        model = build(0)
        return _smallest(lambda size: model, _TV_SIZES.get(name, (32, 64, 96, 128, 224)))

    return make


# timm -------------------------------------------------------------------------------------------------------

# (architecture, family, input size, creation kwargs): the smallest variant of each family, random weights.
_TIMM = [
    ("resnet18d", "ResNet-D", 32, {}),
    ("efficientnet_b0", "EfficientNet", 32, {}),
    ("mobilenetv3_small_050", "MobileNetV3", 32, {}),
    ("mobilenetv4_conv_small_035", "MobileNetV4", 32, {}),
    ("regnetx_002", "RegNet", 32, {}),
    ("convnext_atto", "ConvNeXt", 32, {}),
    ("deit_tiny_patch16_224", "DeiT", 32, {"img_size": 32}),
    ("vit_tiny_patch16_224", "ViT", 32, {"img_size": 32}),
    ("eva02_tiny_patch14_224", "EVA-02 (RoPE, SwiGLU)", 28, {"img_size": 28}),
    ("swin_tiny_patch4_window7_224", "Swin", 64, {"img_size": 64, "window_size": 2}),
    ("maxvit_pico_rw_256", "MaxViT", 64, {"img_size": 64}),
    ("coatnet_pico_rw_224", "CoAtNet", 64, {"img_size": 64}),
    ("mixer_s16_224", "MLP-Mixer", 32, {"img_size": 32}),
    ("resmlp_12_224", "ResMLP", 32, {"img_size": 32}),
    ("gmlp_ti16_224", "gMLP", 32, {"img_size": 32}),
    ("poolformer_s12", "PoolFormer", 32, {}),
    ("efficientformer_l1", "EfficientFormer", 224, {}),  # its attention biases are sized for 7x7 at /32
    ("levit_128s", "LeViT", 64, {"img_size": 64}),
    ("mobilevit_xxs", "MobileViT", 64, {}),
    ("edgenext_xx_small", "EdgeNeXt", 64, {}),
    ("repvgg_a0", "RepVGG", 32, {}),
    ("ghostnet_050", "GhostNet", 32, {}),
    ("xcit_nano_12_p16_224", "XCiT", 32, {"img_size": 32}),
    ("cait_xxs24_224", "CaiT", 32, {"img_size": 32}),
    ("pvt_v2_b0", "PVTv2", 32, {}),
    ("mobileone_s0", "MobileOne", 32, {}),
    ("fastvit_t8", "FastViT", 64, {}),
    ("efficientvit_b0", "EfficientViT (MIT)", 64, {}),
    ("lcnet_050", "LCNet", 32, {}),
    ("hgnetv2_b0", "HGNetV2", 64, {}),
    ("nf_resnet26", "NF-ResNet", 32, {}),
    ("resnest14d", "ResNeSt", 32, {}),
    ("dla34", "DLA", 32, {}),
    ("inception_next_atto", "InceptionNeXt", 32, {}),
    ("starnet_s050", "StarNet", 32, {}),
    ("mambaout_femto", "MambaOut", 32, {}),
    ("tiny_vit_5m_224", "TinyViT", 32, {}),
    ("focalnet_tiny_srf", "FocalNet", 64, {}),
]


def timm_entries() -> list[Entry]:
    """At least one small architecture of each of ~40 timm families, ``pretrained=False``."""
    if not available("timm"):
        return []
    return [Entry(f"timm/{name}", "timm", _timm_maker(name, size, kwargs), family=family)
            for name, family, size, kwargs in _TIMM]


def _timm_maker(name: str, size: int, kwargs: dict) -> Callable[[], Built]:
    def make() -> Built:
        timm = _import_vision("timm")
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
        return Built(model, (_image(size),), note=f"{size}x{size}")

    return make


# Hugging Face transformers ----------------------------------------------------------------------------------

_TEXT = dict(vocab_size=VOCAB, max_position_embeddings=64)
_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_TEXT)
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, **_TEXT)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_channels=3)

# (family, config class, model class, input kind, config kwargs). Input kinds: "text" (token ids (2, 8)),
# "image:N" (one NxN image), "audio" (one 1600-sample waveform), "mel" (one 80-bin log-mel spectrogram).
_HF: list[tuple[str, str, str, str, dict]] = [
    # encoders
    ("bert", "BertConfig", "BertForSequenceClassification", "text", dict(_ENCODER, num_labels=3)),
    ("roberta", "RobertaConfig", "RobertaForSequenceClassification", "text",
     dict(_ENCODER, num_labels=3, pad_token_id=1, max_position_embeddings=66)),
    ("distilbert", "DistilBertConfig", "DistilBertForSequenceClassification", "text",
     dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3, **_TEXT)),
    ("albert", "AlbertConfig", "AlbertForSequenceClassification", "text",
     dict(_ENCODER, embedding_size=16, num_labels=3)),
    ("electra", "ElectraConfig", "ElectraForSequenceClassification", "text",
     dict(_ENCODER, embedding_size=16, num_labels=3)),
    ("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", "text",
     dict(_ENCODER, num_labels=3, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"])),
    ("mpnet", "MPNetConfig", "MPNetForSequenceClassification", "text", dict(_ENCODER, num_labels=3)),
    ("modernbert", "ModernBertConfig", "ModernBertForSequenceClassification", "text",
     dict(_ENCODER, num_labels=3, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
          bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)),
    ("mobilebert", "MobileBertConfig", "MobileBertForSequenceClassification", "text",
     dict(_ENCODER, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2,
          num_labels=3)),
    ("convbert", "ConvBertConfig", "ConvBertForSequenceClassification", "text",
     dict(_ENCODER, embedding_size=32, num_labels=3)),
    ("roformer", "RoFormerConfig", "RoFormerForSequenceClassification", "text",
     dict(_ENCODER, embedding_size=32, num_labels=3)),
    # decoders
    ("gpt2", "GPT2Config", "GPT2LMHeadModel", "text",
     dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)),
    ("gpt-neo", "GPTNeoConfig", "GPTNeoForCausalLM", "text",
     dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4,
          intermediate_size=64, bos_token_id=0, eos_token_id=0, **_TEXT)),
    ("gpt-j", "GPTJConfig", "GPTJForCausalLM", "text",
     dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64)),
    ("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "text", dict(_ENCODER, rotary_pct=0.5)),
    ("gpt-bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "text",
     dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, multi_query=True)),
    ("codegen", "CodeGenConfig", "CodeGenForCausalLM", "text",
     dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64, n_ctx=64)),
    ("opt", "OPTConfig", "OPTForCausalLM", "text",
     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
          pad_token_id=1, **_TEXT)),
    ("bloom", "BloomConfig", "BloomForCausalLM", "text", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB)),
    ("falcon", "FalconConfig", "FalconForCausalLM", "text",
     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
          new_decoder_architecture=False)),
    ("llama", "LlamaConfig", "LlamaForCausalLM", "text", _DECODER),
    ("mistral", "MistralConfig", "MistralForCausalLM", "text", dict(_DECODER, sliding_window=4)),
    ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "text", _DECODER),
    ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "text", dict(_DECODER, head_dim=8)),
    ("phi", "PhiConfig", "PhiForCausalLM", "text", _DECODER),
    ("phi3", "Phi3Config", "Phi3ForCausalLM", "text", _DECODER),
    ("gemma", "GemmaConfig", "GemmaForCausalLM", "text", dict(_DECODER, head_dim=8)),
    ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "text", dict(_DECODER, head_dim=8, sliding_window=4)),
    ("stablelm", "StableLmConfig", "StableLmForCausalLM", "text", _DECODER),
    ("olmo", "OlmoConfig", "OlmoForCausalLM", "text", _DECODER),
    ("olmo2", "Olmo2Config", "Olmo2ForCausalLM", "text", _DECODER),
    ("cohere", "CohereConfig", "CohereForCausalLM", "text", _DECODER),
    ("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", "text", _DECODER),
    ("granite", "GraniteConfig", "GraniteForCausalLM", "text", _DECODER),
    ("biogpt", "BioGptConfig", "BioGptForCausalLM", "text", _ENCODER),
    ("xglm", "XGLMConfig", "XGLMForCausalLM", "text",
     dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, **_TEXT)),
    # encoders of encoder-decoder models
    ("t5-encoder", "T5Config", "T5EncoderModel", "text",
     dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, relative_attention_num_buckets=8)),
    ("t5-encoder (gated-gelu, mt5)", "MT5Config", "MT5EncoderModel", "text",
     dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, relative_attention_num_buckets=8)),
    ("bart-encoder", "BartConfig", "BartModel.encoder", "text",
     dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
          encoder_ffn_dim=64, decoder_ffn_dim=64, **_TEXT)),
    ("whisper-encoder", "WhisperConfig", "WhisperModel.encoder", "mel",
     dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
          encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=8, vocab_size=VOCAB,
          pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)),
    # vision
    ("vit", "ViTConfig", "ViTForImageClassification", "image:16",
     dict(_VISION, image_size=16, patch_size=4, num_labels=NUM_CLASSES)),
    ("deit", "DeiTConfig", "DeiTForImageClassification", "image:16",
     dict(_VISION, image_size=16, patch_size=4, num_labels=NUM_CLASSES)),
    ("beit", "BeitConfig", "BeitForImageClassification", "image:16",
     dict(_VISION, image_size=16, patch_size=4, num_labels=NUM_CLASSES, use_relative_position_bias=True)),
    ("dinov2", "Dinov2Config", "Dinov2ForImageClassification", "image:16",
     dict(_VISION, image_size=16, patch_size=4, num_labels=NUM_CLASSES)),
    ("swin", "SwinConfig", "SwinForImageClassification", "image:32",
     dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
          num_labels=NUM_CLASSES)),
    ("convnext", "ConvNextConfig", "ConvNextForImageClassification", "image:32",
     dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_CLASSES)),
    ("resnet", "ResNetConfig", "ResNetForImageClassification", "image:32",
     dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=NUM_CLASSES)),
    ("mobilevit", "MobileViTConfig", "MobileViTForImageClassification", "image:64",
     dict(hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 24, 32], num_labels=NUM_CLASSES)),
    ("segformer", "SegformerConfig", "SegformerForImageClassification", "image:32",
     dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
          strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=NUM_CLASSES)),
    ("clip-vision", "CLIPVisionConfig", "CLIPVisionModelWithProjection", "image:16",
     dict(_VISION, image_size=16, patch_size=4, projection_dim=8)),
    ("siglip-vision", "SiglipVisionConfig", "SiglipVisionModel", "image:16",
     dict(_VISION, image_size=16, patch_size=4)),
    # audio
    ("wav2vec2", "Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", "audio",
     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
          num_conv_pos_embedding_groups=4, classifier_proj_size=8, num_labels=3)),
]


# Models whose first output does not depend on their last parameters: predict the pooled output instead.
_HF_OUTPUT = {"SiglipVisionModel": "pooler_output"}


def transformers_entries() -> list[Entry]:
    """Tiny random-weight models of ~50 Hugging Face families, built offline from configs."""
    if not available("transformers"):
        return []
    return [Entry(f"transformers/{family}", "transformers", _hf_maker(config, model, kind, kwargs), family=family)
            for family, config, model, kind, kwargs in _HF]


def _hf_maker(config_name: str, model_name: str, kind: str, kwargs: dict) -> Callable[[], Built]:
    def make() -> Built:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # transformers imports torchvision where it is installed (image processors), which on the CPU
        # torch needs the same help as a direct import.
        transformers = _import_vision("transformers")
        transformers.logging.set_verbosity_error()

        config = getattr(transformers, config_name)(**kwargs)
        class_name, _, part = model_name.partition(".")
        model = getattr(transformers, class_name)(config)
        if part:
            model = getattr(model, part) if hasattr(model, part) else getattr(model, f"get_{part}")()
        generator = torch.Generator().manual_seed(0)
        if kind == "text":
            args = (torch.randint(3, VOCAB, (2, 8), generator=generator),)
        elif kind.startswith("image:"):
            args = (_image(int(kind.split(":")[1])),)
        elif kind == "audio":
            args = (torch.randn(1, 1600, generator=generator),)
        elif kind == "mel":
            args = (torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=generator),)
        else:
            raise ValueError(f"unknown input kind {kind}")
        return Built(model, args, note=kind, output=_HF_OUTPUT.get(model_name))

    return make


# The CI subset (tests/test_zoo.py, ``bench_zoo.py --quick``): small models that run today, one per kind.
QUICK = ("torchvision/resnet18", "torchvision/mnasnet0_5", "timm/starnet_s050",
         "transformers/bert", "transformers/gpt2", "transformers/llama")
