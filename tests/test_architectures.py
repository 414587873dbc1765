"""Real architectures as test subjects: Hugging Face models built from configs with random weights.

Nothing is downloaded. Sizes are tiny (hidden 32-64, 1-2 layers, 12 tokens, 32x32 images) so the
whole matrix converts, emulates and diagnoses in a few minutes on two cores. Each model converts
with its own input names, runs under every compute unit's profile, and diagnoses with layers
named by Hugging Face module paths. The heaviest are marked ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import coreml_lab as cl
from coreml_lab import messages

VOCAB = 128
SEQ = 12
IMAGE = 32


def _ids(batch: int = 1, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _mask(batch: int = 1, seq: int = SEQ) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, -2:] = 0  # padding at the end: the mask matters
    return mask


def _fan_in_init(model):
    """Weights that keep activations at unit scale through a deep stack of convolutions (MobileViT's
    default init - weights of std 0.02, batch-norm scales of std 0.02 - shrinks them to exactly 0)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, std=1.4 / module.weight[0].numel() ** 0.5)
    return model


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval(), {"input_ids": _ids(), "attention_mask": _mask()}, "encoder.layer.0.attention.self.query"


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": _ids()}, "transformer.h.0.attn.c_attn"


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return (LlamaForCausalLM(cfg).eval(), {"input_ids": _ids(), "attention_mask": torch.ones(1, SEQ, dtype=torch.long)},
            "model.layers.0.self_attn.q_proj")


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5EncoderModel(cfg).eval(), {"input_ids": _ids(), "attention_mask": _mask()}, "encoder.block.0.layer.0.SelfAttention.q"


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=SEQ)
    return CLIPTextModel(cfg).eval(), {"input_ids": _ids()}, "text_model.encoder.layers.0.self_attn.q_proj"


def vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=IMAGE, patch_size=8)
    return ViTModel(cfg).eval(), {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE)}, "encoder.layer.0.attention.attention.query"


def convnext():
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    return ConvNextModel(cfg).eval(), {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE)}, "encoder.stages.0.layers.0.dwconv"


def resnet():
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return ResNetModel(cfg).eval(), {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE)}, "encoder.stages.0.layers.0"


def mobilevit():
    from transformers import MobileViTConfig, MobileViTModel

    cfg = MobileViTConfig(image_size=IMAGE, patch_size=2, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                          num_attention_heads=2, mlp_ratio=2.0)
    return (_fan_in_init(MobileViTModel(cfg)).eval(), {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE)},
            "encoder.layer.2.transformer.layer.0.attention.attention.query")


def segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                          patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=3,
                          initializer_range=0.2)  # the default 0.02 leaves outputs near 1e-6
    return (SegformerForSemanticSegmentation(cfg).eval(), {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE)},
            "segformer.encoder.block.0.0.attention.self.query")


def whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=16,
                        vocab_size=VOCAB)
    return WhisperEncoder(cfg).eval(), {"input_features": torch.randn(1, 16, 32)}, "layers.0.self_attn.q_proj"


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, do_stable_layer_norm=False)
    return Wav2Vec2Model(cfg).eval(), {"input_values": torch.randn(1, 400)}, "encoder.layers.0.attention.q_proj"


ARCHITECTURES = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "t5_encoder": t5_encoder, "clip_text": clip_text, "vit": vit,
    "convnext": convnext, "resnet": resnet, "mobilevit": mobilevit, "segformer": segformer,
    "whisper_encoder": whisper_encoder, "wav2vec2": wav2vec2,
}


SLOW = {"mobilevit", "segformer"}
UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
#: FP16 findings the diagnosis must report instead of "close" (architecture -> (module, reason))
FP16_BROKEN = {
    # T5 adds (1 - mask) * finfo(float32).min: the constant is -inf in FP16, and 0 * -inf is NaN
    "t5_encoder": ("encoder", "overflows in FP16"),
}


def _params():
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else []) for name in ARCHITECTURES]


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = ARCHITECTURES[name]()
        return cache[name]

    return get


@pytest.mark.parametrize("name", _params())
def test_architecture_converts_emulates_and_diagnoses(name, built):
    from coreml_lab.emulator import EmulatedModel
    model, inputs, path = built(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = cl.ConversionOptions(precision="fp16")
    conversion = cl.convert(model, inputs, options)
    spec = conversion.mlmodel.get_spec()
    assert [i.name for i in spec.description.input] == list(inputs), "the model's own input names"
    assert conversion.method == "torch.jit.trace"
    assert any(m.text.startswith(f"traced as {type(model).__name__}(") for m in conversion.messages)

    with torch.no_grad():
        returned = {k: v.numpy() for k, v in model(**inputs).items() if isinstance(v, torch.Tensor)}
    want = list(returned.values())  # ModelOutput order
    feeds = conversion.example_inputs.as_numpy()
    output_names = [o.name for o in spec.description.output]
    assert output_names == list(returned), "the outputs keep the model's own names (logits, last_hidden_state ...)"
    for unit in UNITS:
        got = EmulatedModel(conversion.mlmodel, unit).predict(feeds)
        assert list(got) == output_names
        for name_out, expected in zip(output_names, want):
            value = got[name_out]
            assert value.shape == expected.shape, (unit, name_out)
            if name in FP16_BROKEN:
                continue
            assert np.isfinite(value).all(), (unit, name_out)
            scale = np.abs(expected).max()
            assert scale > 1e-3, f"{name}: a degenerate reference ({name_out} peaks at {scale:g})"
            assert np.abs(value - expected).max() <= 0.05 * scale, (unit, name_out)

    report = cl.diagnose(model, inputs, options, progress=False)
    modules = set(report.layers["module"].dropna())
    assert path in modules, f"{path} not among the diagnosed modules {sorted(modules)[:20]}"
    assert set(report.layers["compute_unit"]) == set(UNITS)
    if name in FP16_BROKEN:
        module, reason = FP16_BROKEN[name]
        culprits = report.culprits(3)
        assert len(culprits) and culprits.iloc[0]["module"] == module
        assert reason in culprits.iloc[0]["reason"]
        assert "BROKEN" in report.summary()
    else:
        assert "BROKEN" not in report.summary() and "close to PyTorch" in report.summary()
        named = report.culprits(50, tolerance=1e-6)["module"].dropna()
        assert any("." in m for m in named), f"culprits are named by Hugging Face module paths: {report.culprits(50, tolerance=1e-6)}"
    for k, v in model.state_dict().items():  # nothing the user supplied is modified
        assert torch.equal(v, before[k]), k


def test_decoder_lms_convert_through_coreml_labs_composites(built):
    model, inputs, _ = built("gpt2")
    conversion = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"))
    texts = [m.text for m in conversion.messages]
    assert any("aten::diff" in t and "composite" in t for t in texts)
    assert any("attention masks (transformers.masking_utils) were built by broadcasting" in t for t in texts)
    vit, vit_inputs, _ = built("vit")  # no masks: no such note
    assert not any("masking_utils" in m.text for m in cl.convert(vit, vit_inputs).messages)
    assert model.config.use_cache and model.config.return_dict, "the user's config is left as it was"
    import transformers.masking_utils as masking

    assert masking._vmap_for_bhqkv.__module__ == "transformers.masking_utils", "transformers is restored"


def test_hf_model_traced_by_hand_fails_with_the_explained_vmap_message(built):
    model, inputs, _ = built("llama")

    class Plain(torch.nn.Module):  # what users write: no keyword wrapper, no broadcast masks
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False)[0]

    traced_error = None
    try:
        torch.jit.trace(Plain(), (inputs["input_ids"], inputs["attention_mask"]), check_trace=False)
    except RuntimeError as exc:
        traced_error = str(exc)
    assert traced_error is not None and "unordered_map::at" in traced_error
    explanation = messages.explain(traced_error)
    assert explanation.key == "trace_vmap" and "Pass the Hugging Face model itself" in explanation.fix
