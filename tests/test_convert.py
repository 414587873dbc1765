"""convert(): sources, options, messages with explanations, the on-disk cache, bad input."""

from __future__ import annotations

import importlib
import sys

import coremltools as ct
import numpy as np
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab import messages
from coreml_lab.convert import ConversionError, clear_cache
from coreml_lab.sources import ExampleInputsError, MissingExtraError, SourceError


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.lin(x))


def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(2, 4),)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("name", sample_models.SAMPLES)
def test_every_sample_converts(name, precision):
    model, inputs, _ = sample_models.build(name)
    conv = cl.convert(model, inputs, cl.ConversionOptions(precision=precision))
    assert conv.spec_version >= 6 and conv.options.precision == precision
    assert conv.program is not None and conv.op_types()
    assert conv.method in ("torch.jit.trace", "torch.export")
    dtypes = {op.outputs[0].dtype for f in conv.program.functions.values() for op in f.operations
              if op.op_type not in ("const", "cast") and op.outputs and hasattr(op.outputs[0], "dtype")}
    has_fp16 = any(getattr(d, "__name__", "") == "fp16" or "fp16" in str(d) for d in dtypes)
    from coremltools.converters.mil.mil import types
    has_fp16 = any(types.builtin_to_string(d) == "fp16" for d in dtypes if d is not None and types.is_float(d))
    assert has_fp16 == (precision == "fp16")


def test_conversion_keeps_model_program_spec_time_and_messages():
    model, inputs = tiny()
    conv = cl.convert(model, inputs, cl.ConversionOptions(target="iOS16"), cache=False)
    assert isinstance(conv.mlmodel, ct.models.MLModel)
    assert conv.spec_version == 7 and conv.wall_time > 0
    assert "linear" in conv.op_types() and "relu" in conv.op_types()
    texts = [m.text for m in conv.messages]
    assert "converted via torch.jit.trace" in texts
    assert conv.example_inputs.names == ("x",)


def test_untested_torch_message_is_captured_and_explained():
    model, inputs = tiny()
    conv = cl.convert(model, inputs, cl.ConversionOptions())
    hits = [m for m in conv.messages if m.explanation and m.explanation.key == "untested_torch"]
    assert hits and "has not been tested with coremltools" in hits[0].text
    assert hits[0].source == "coremltools import"


def test_fp16_constant_overflow_is_produced_by_a_real_conversion_and_explained():
    model, inputs, _ = sample_models.build("transformer_mask")
    conv16 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
    keys = [m.explanation.key for m in conv16.explained]
    assert "fp16_constant_overflow" in keys
    msg = next(m for m in conv16.explained if m.explanation.key == "fp16_constant_overflow")
    assert "overflow encountered in cast" in msg.text and msg.explanation.pitfall == "P1"
    assert "FLOAT32" in msg.explanation.fix
    conv32 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"))
    assert "fp16_constant_overflow" not in [m.explanation.key for m in conv32.explained]


def test_fp16_io_below_ios16_fails_with_explained_error():
    model, inputs, _ = sample_models.build("fp16_io")
    with pytest.raises(ConversionError) as err:
        cl.convert(model, inputs, cl.ConversionOptions(target="iOS15"))
    assert err.value.explanation is not None and err.value.explanation.key == "fp16_io_needs_ios16"
    assert "iOS16" in str(err.value)
    ok = cl.convert(model, inputs, cl.ConversionOptions(target="iOS16"))
    ins, outs = ok.io_dtypes()
    assert ins == {"x": "FLOAT16"} and ok.spec_version == 7


def test_mlprogram_below_ios15_is_explained():
    model, inputs = tiny()
    with pytest.raises(ConversionError) as err:
        cl.convert(model, inputs, cl.ConversionOptions(target="iOS14"))
    assert err.value.explanation.key == "mlprogram_needs_ios15"


@pytest.mark.parametrize("text, key", [
    # Core ML's load-time validator on macOS / iOS (not reachable from Linux): the text from the field report
    ("Error reading protobuf spec. validator error: Model input 'x' has a different type than its "
     "corresponding input to the main function. FLOAT16 dataType is only valid in specification version >= 7. "
     "This model has version 5", "fp16_needs_spec7"),
    # the device compiler's log line from the iOS16 iPad report
    ("E5RT: Strides of Conv needs to be product of at most 2 interleave factors (11)", "conv_stride_interleave"),
])
def test_device_side_messages_are_explained(text, key):
    exp = messages.explain(text)
    assert exp is not None and exp.key == key and exp.fix


def test_unknown_messages_are_not_explained():
    assert messages.explain("everything is fine") is None


def test_cache_hit_does_not_call_coremltools_and_changed_weight_misses(fresh_cache, monkeypatch):
    model, inputs = tiny()
    first = cl.convert(model, inputs, cl.ConversionOptions())
    assert not first.from_cache and first.cache_key

    import coremltools.models.ml_program.experimental.torch.debugging_utils as du

    calls = []
    real_convert, real_mapping = ct.convert, du.convert_and_retrieve_op_mapping

    def counting_convert(*a, **k):
        calls.append("ct.convert")
        return real_convert(*a, **k)

    def counting_mapping(*a, **k):
        calls.append("convert_and_retrieve_op_mapping")
        return real_mapping(*a, **k)

    monkeypatch.setattr(ct, "convert", counting_convert)
    monkeypatch.setattr(du, "convert_and_retrieve_op_mapping", counting_mapping)
    second = cl.convert(model, inputs, cl.ConversionOptions())
    assert second.from_cache and not calls
    assert second.cache_key == first.cache_key
    # the cached program keeps the torch scopes, and runs the same
    from coreml_lab.emulator import EmulatedModel
    feeds = {"x": inputs[0].numpy()}
    a = EmulatedModel(first.mlmodel, "CPU_AND_GPU").predict(feeds)
    b = EmulatedModel(second.mlmodel, "CPU_AND_GPU").predict(feeds)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    def scopes(program):
        return {op.name: {k.name: list(v) for k, v in op.scopes.items()}
                for op in program.functions["main"].operations if op.op_type != "const"}

    assert scopes(second.program) == scopes(first.program)  # the torch scopes survive the cache
    from coreml_lab.mapping import build_layer_map
    assert "lin" in build_layer_map(second.program).chains.values().__iter__().__next__()

    with torch.no_grad():
        model.lin.weight[0, 0] += 1.0
    third = cl.convert(model, inputs, cl.ConversionOptions())
    assert not third.from_cache and calls and third.cache_key != first.cache_key

    other = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"))
    assert not other.from_cache
    assert clear_cache() == 3
    assert not cl.convert(model, inputs, cl.ConversionOptions()).from_cache


def test_damaged_cache_entry_is_a_miss(fresh_cache):
    model, inputs = tiny()
    first = cl.convert(model, inputs, cl.ConversionOptions())
    (fresh_cache / first.cache_key / "meta.json").write_text("{not json")
    importlib.import_module("coreml_lab.conversion_cache")._RECENT.clear()  # as in a new process
    with pytest.warns(UserWarning, match="damaged"):
        again = cl.convert(model, inputs, cl.ConversionOptions())
    assert not again.from_cache


def test_user_model_and_inputs_are_not_modified():
    model, inputs = tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs[0].clone()
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    assert model.training, "the user's module must stay in training mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(inputs[0], x)
    assert any("training mode" in m.text for m in conv.messages)


def test_trace_failure_falls_back_to_torch_export_and_says_so():
    class DictOut(torch.nn.Module):
        def forward(self, x):
            return {"double": x * 2, "next": x + 1}

    conv = cl.convert(DictOut(), (torch.randn(2, 3),), cl.ConversionOptions(), cache=False)
    assert conv.method == "torch.export"
    assert any("torch.jit.trace failed" in m.text for m in conv.messages)


def test_torchscript_file_exported_program_and_pt2_convert(tmp_path):
    model, inputs = tiny()
    ts = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(model, inputs), str(ts))
    assert cl.convert(str(ts), inputs, cl.ConversionOptions()).method == "torchscript"
    ep = torch.export.export(model, inputs)
    conv = cl.convert(ep, inputs, cl.ConversionOptions())
    assert conv.method == "exported_program" and "linear" in conv.op_types()
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(ep, str(pt2))
    assert cl.convert(pt2, inputs, cl.ConversionOptions()).source_kind == "exported"


def test_existing_mlpackage_is_loaded_not_converted(tmp_path, monkeypatch):
    model, inputs = tiny()
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    path = tmp_path / "tiny.mlpackage"
    conv.mlmodel.save(str(path))
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("must not convert an .mlpackage"))
    loaded = cl.convert(str(path), inputs)
    assert loaded.method == "loaded" and loaded.program is not None
    assert [op.op_type for op in loaded.program.functions["main"].operations if op.op_type != "const"] == \
        [op.op_type for op in conv.program.functions["main"].operations if op.op_type != "const"]


def test_missing_path_and_unsupported_file_type_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist .*\.mlpackage"):
        cl.convert(tmp_path / "nope.pt", None)
    bad = tmp_path / "model.txt"
    bad.write_text("hello")
    with pytest.raises(SourceError, match=r"unsupported model file type '.txt'.*\.onnx"):
        cl.convert(bad, None)
    with pytest.raises(SourceError, match="unsupported model type"):
        cl.convert(object(), None)


def test_mismatched_example_inputs_name_what_was_expected():
    model, _ = tiny()
    with pytest.raises(ExampleInputsError) as err:
        cl.convert(model, (torch.randn(2, 5),))
    text = str(err.value)
    assert "forward(x)" in text and "(2, 5)" in text
    with pytest.raises(ExampleInputsError, match=r"unknown: \['y'\]"):
        cl.convert(model, {"y": torch.randn(2, 4)})
    with pytest.raises(ExampleInputsError, match="required"):
        cl.convert(model, None)


def test_onnx_without_extra_says_how_to_install(tmp_path, monkeypatch):
    model, inputs, _ = sample_models.build("asr_onnx")
    path = sample_models.asr_onnx.export_onnx(tmp_path / "asr.onnx")
    assert path.exists() and path.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # as if the extra were not installed
    with pytest.raises(MissingExtraError) as err:
        cl.convert(path, inputs)
    assert "onnx-import" in str(err.value) and "pip install" in str(err.value)


# ---------------------------------------------------------------------------- stock layers, keyword inputs, composites

def transformer_encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    return model, (torch.randn(2, 10, 32),)


def test_transformer_encoder_takes_the_fused_fast_path_that_coremltools_cannot_convert():
    model, inputs = transformer_encoder()
    with torch.no_grad():  # the premise: traced as is, torch records its fused kernel
        traced = torch.jit.trace(model, inputs, check_trace=False)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::_transformer_encoder_layer_fwd" in kinds
    with pytest.raises(ConversionError) as err:  # a TorchScript the kit cannot re-trace: explained
        cl.convert(traced, inputs, cl.ConversionOptions(), cache=False)
    assert err.value.explanation.key == "mha_fast_path"
    assert "_transformer_encoder_layer_fwd" in str(err.value) and "set_fastpath_enabled(False)" in str(err.value)


def test_transformer_encoder_converts_emulates_and_diagnoses_with_module_paths():
    from coreml_lab.emulator import EmulatedModel

    model, inputs = transformer_encoder()
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        conv = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"), cache=False)
        want = model(*inputs).numpy()
    assert torch.backends.mha.get_fastpath_enabled(), "the fast-path flag is restored"
    notes = [m.text for m in conv.messages if "fast path" in m.text]
    assert len(notes) == 1 and "set_fastpath_enabled(False)" in notes[0] and "layers.0.self_attn" in notes[0]
    assert conv.method == "torch.jit.trace" and "_transformer_encoder_layer_fwd" not in str(conv.op_types())
    for unit in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"):
        got = next(iter(EmulatedModel(conv.mlmodel, unit).predict({"src": inputs[0].numpy()}).values()))
        assert np.abs(got - want).max() < (1e-4 if unit == "CPU_ONLY" else 2e-2)
    with torch.no_grad():
        report = cl.diagnose(model, inputs, cl.ConversionOptions(precision="fp16"), progress=False)
    assert torch.backends.mha.get_fastpath_enabled()
    modules = set(report.layers["module"].dropna())
    assert {"layers.0.self_attn", "layers.1.linear1", "layers.1.norm2"} <= modules
    culprits = report.culprits(20, tolerance=1e-6)
    assert len(culprits) and all(m.startswith("layers.") for m in culprits["module"].dropna())
    assert report.layers["torch_rel_err"].notna().any(), "torch's own module outputs were compared (hooks fired)"


def test_fast_path_flag_is_restored_when_the_forward_fails():
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            assert not torch.backends.mha.get_fastpath_enabled()
            raise RuntimeError("boom")

    with pytest.raises(ExampleInputsError, match="boom"):
        cl.convert(Failing().eval(), (torch.randn(1, 3, 8),))
    assert torch.backends.mha.get_fastpath_enabled()


def test_models_without_fused_layers_get_no_fast_path_note():
    model, inputs = tiny()
    conv = cl.convert(model, inputs, cl.ConversionOptions(), cache=False)
    assert not any("fast path" in m.text for m in conv.messages)
    assert conv.source.module is model, "a plain module is traced as it is"


def test_dict_inputs_keep_their_names_and_optional_parameters_may_be_left_out():
    class Optional_(torch.nn.Module):
        def forward(self, tokens, scale=None, mask=None):
            out = tokens * 2.0
            if mask is not None:
                out = out * mask
            return out

    tokens, mask = torch.randn(2, 5), (torch.rand(2, 5) > 0.5).float()
    conv = cl.convert(Optional_(), {"mask": mask, "tokens": tokens}, cl.ConversionOptions(precision="fp32"), cache=False)
    assert [i.name for i in conv.mlmodel.get_spec().description.input] == ["tokens", "mask"]  # forward's order
    from coreml_lab.emulator import EmulatedModel

    got = next(iter(EmulatedModel(conv.mlmodel, "CPU_ONLY").predict({"tokens": tokens.numpy(), "mask": mask.numpy()}).values()))
    assert np.allclose(got, (tokens * 2 * mask).numpy())
    with pytest.raises(ExampleInputsError, match=r"missing: \['tokens'\]"):
        cl.convert(Optional_(), {"mask": mask})


def test_batch_encoding_inputs_keep_hugging_face_names():
    from transformers import BatchEncoding, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    batch = BatchEncoding({"input_ids": torch.randint(0, 64, (1, 8)), "token_type_ids": torch.zeros(1, 8, dtype=torch.long),
                           "attention_mask": torch.ones(1, 8, dtype=torch.long)})
    conv = cl.convert(model, batch, cl.ConversionOptions(precision="fp32"), cache=False)
    assert [i.name for i in conv.mlmodel.get_spec().description.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}, "the user's BatchEncoding is kept"
    assert model.config.return_dict


@pytest.mark.parametrize("case", ["prepend", "append_n2", "dim0", "bool", "plain"])
def test_diff_composite_matches_torch(case):
    from coreml_lab.emulator import EmulatedModel

    class Diff(torch.nn.Module):
        def forward(self, x, extra):
            if case == "prepend":
                return torch.diff(x, dim=-1, prepend=extra)
            if case == "append_n2":
                return torch.diff(x, n=2, dim=-1, append=extra)
            if case == "dim0":
                return torch.diff(x, dim=0)
            if case == "bool":
                return torch.diff(x > 0, dim=1).float()
            return torch.diff(x)

    torch.manual_seed(1)
    x, extra = torch.randn(3, 7), torch.randn(3, 2)
    conv = cl.convert(Diff(), (x, extra), cl.ConversionOptions(precision="fp32"), cache=False)
    assert any("aten::diff" in m.text and "composite" in m.text for m in conv.messages)
    got = next(iter(EmulatedModel(conv.mlmodel, "CPU_ONLY").predict({"x": x.numpy(), "extra": extra.numpy()}).values()))
    want = Diff()(x, extra).numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.bool, torch.float32, torch.int64])
def test_new_ones_composite_matches_torch(dtype):
    from coreml_lab.emulator import EmulatedModel

    class NewOnes(torch.nn.Module):
        def forward(self, x):
            ones = x.new_ones((2, x.shape[1]), dtype=dtype) if dtype is not None else x.new_ones((2, x.shape[1]))
            return x + ones.float() if ones.dtype != torch.float32 else x + ones

    x = torch.randn(2, 5)
    conv = cl.convert(NewOnes(), (x,), cl.ConversionOptions(precision="fp32"), cache=False)
    got = next(iter(EmulatedModel(conv.mlmodel, "CPU_ONLY").predict({"x": x.numpy()}).values()))
    assert np.allclose(got, NewOnes()(x).numpy())


def test_composites_never_override_coremltools():
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    from coreml_lab import torch_ops

    torch_ops.register()
    assert torch_ops.register() == []  # idempotent
    assert _TORCH_OPS_REGISTRY["diff"] is torch_ops.diff
    assert _TORCH_OPS_REGISTRY["add"].__module__.startswith("coremltools")
    assert set(torch_ops.COMPOSITES) <= set(_TORCH_OPS_REGISTRY.name_to_func_mapping)


def test_unsupported_fx_node_is_explained():
    exp = messages.explain("Unsupported fx node diff, kind diff")
    assert exp.key == "unsupported_fx_node" and "register_torch_op" in exp.fix


def test_new_ones_composite_with_a_flexible_size_fills_at_run_time():
    from coreml_lab.emulator import EmulatedModel

    class NewOnes(torch.nn.Module):
        def forward(self, x):
            return x + x.new_ones((2, x.shape[1]))

    options = cl.ConversionOptions(precision="fp32", inputs=(ct.TensorType(name="x", shape=(2, ct.RangeDim(1, 16, default=5))),))
    conv = cl.convert(NewOnes(), (torch.randn(2, 5),), options, cache=False)
    assert "fill" in conv.op_types()  # the size is only known at run time
    for n in (3, 7):
        x = torch.randn(2, n)
        got = next(iter(EmulatedModel(conv.mlmodel, "CPU_ONLY").predict({"x": x.numpy()}).values()))
        assert np.allclose(got, NewOnes()(x).numpy())


def test_the_users_input_and_output_specs_are_not_modified_by_a_diagnosis():
    # coremltools sets names, dtypes and shapes on the spec objects it converts with; those are the user's
    class Scale(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 3.0

    x_spec, y_spec = ct.TensorType(name="x", shape=(2, 8)), ct.TensorType(name="y")
    options = cl.ConversionOptions(inputs=(x_spec,), outputs=(y_spec,))
    before = (options.key(), vars(x_spec).copy(), vars(y_spec).copy())
    report = cl.diagnose(Scale(), (torch.randn(2, 8),), options, compute_units=["CPU_ONLY"], progress=False)
    assert report.ok and list(report.outputs["output"].unique()) == ["y"]
    assert (options.key(), vars(x_spec), vars(y_spec)) == before
    assert options.outputs[0] is y_spec and y_spec.dtype is None  # FP16 was set on a copy, not on the user's spec
