"""EmulatedModel behaves like MLModel.predict: names, shapes, dtypes, validation, batches, images, paths."""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
import torch

import coreml_lab as cl
from coreml_lab.emulator import (
    EmulatedModel,
    EmulatorInputError,
    NotAnMLProgramError,
    OpExecutionError,
    UnsupportedOpError,
    registry,
    supported_ops,
)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(1, 3, 8, 8)
    return model, x


def _convert(model, x, **ct_kwargs):
    traced = torch.jit.trace(model, (x,))
    kwargs = dict(convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
                  compute_precision=ct.precision.FLOAT32)
    kwargs.update(ct_kwargs)
    inputs = kwargs.pop("inputs", [ct.TensorType(name="image", shape=x.shape)])
    return ct.convert(traced, inputs=inputs, **kwargs)


@pytest.fixture(scope="module")
def ml32(net):
    return _convert(*net)


def test_outputs_have_declared_names_shapes_dtypes(net, ml32):
    model, x = net
    out = EmulatedModel(ml32).predict({"image": x.numpy()})
    (name,) = [o.name for o in ml32.get_spec().description.output]
    assert list(out) == [name]
    assert out[name].shape == (1, 2) and out[name].dtype == np.float32
    np.testing.assert_allclose(out[name], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_fp16_io_model_returns_fp16(net):
    model, x = net
    ml = _convert(model, x, compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS16,
                  inputs=[ct.TensorType(name="image", shape=x.shape, dtype=np.float16)],
                  outputs=[ct.TensorType(name="logits", dtype=np.float16)])
    out = EmulatedModel(ml, "CPU_AND_GPU").predict({"image": x.numpy()})
    assert out["logits"].dtype == np.float16


@pytest.mark.parametrize("data, words", [
    ({}, ["missing ['image']", "image: fp32 (1, 3, 8, 8)"]),
    ({"image": np.zeros((1, 3, 8, 8), np.float32), "mask": 1}, ["unexpected ['mask']"]),
    ({"img": np.zeros((1, 3, 8, 8), np.float32)}, ["missing ['image']", "unexpected ['img']"]),
    ({"image": np.zeros((1, 3, 8, 9), np.float32)}, ["shape (1, 3, 8, 9)", "expected image: fp32 (1, 3, 8, 8)"]),
    ({"image": np.array([["a"]])}, ["dtype <U1", "expected numbers"]),
])
def test_bad_inputs_name_what_was_expected(ml32, data, words):
    with pytest.raises(EmulatorInputError) as err:
        EmulatedModel(ml32).predict(data)
    for w in words:
        assert w in str(err.value)


def test_data_must_be_dict_or_list_of_dicts(ml32):
    em = EmulatedModel(ml32)
    with pytest.raises(TypeError, match="dict of input name"):
        em.predict(np.zeros((1, 3, 8, 8)))
    with pytest.raises(TypeError, match="only dictionaries"):
        em.predict([{"image": np.zeros((1, 3, 8, 8))}, 3])


def test_user_data_is_not_modified_and_torch_and_lists_are_accepted(net, ml32):
    model, x = net
    arr = x.numpy().astype(np.float64)  # float64 is accepted and cast, like MLModel.predict
    before = arr.copy()
    em = EmulatedModel(ml32)
    a = em.predict({"image": arr})
    assert np.array_equal(arr, before) and arr.dtype == np.float64
    b = em.predict({"image": x})
    c = em.predict({"image": x.numpy().tolist()})
    key = next(iter(a))
    assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], c[key])


def test_batch_prediction_returns_a_list(net, ml32):
    _, x = net
    em = EmulatedModel(ml32)
    outs = em.predict([{"image": x.numpy()}, {"image": (x * 0).numpy()}])
    assert isinstance(outs, list) and len(outs) == 2
    key = next(iter(outs[0]))
    assert not np.array_equal(outs[0][key], outs[1][key])


def _check_flexible_input(ml, model, shape, bad_shape, allowed):
    """A flexible "image" input: another allowed ``shape`` runs like torch; ``bad_shape`` fails naming ``allowed``."""
    em = EmulatedModel(ml)
    x = torch.rand(*shape)
    got = next(iter(em.predict({"image": x.numpy()}).values()))
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(EmulatorInputError, match=allowed):
        em.predict({"image": np.zeros(bad_shape, np.float32)})


def test_enumerated_and_ranged_shapes(net):
    model, x = net
    ml = _convert(model, x, inputs=[ct.TensorType(name="image", shape=ct.EnumeratedShapes(
        shapes=[(1, 3, 8, 8), (1, 3, 16, 16)], default=(1, 3, 8, 8)))])
    _check_flexible_input(ml, model, (1, 3, 16, 16), (1, 3, 12, 12), r"\(1, 3, 8, 8\) or \(1, 3, 16, 16\)")
    ml = _convert(model, x, inputs=[ct.TensorType(name="image", shape=(1, 3, ct.RangeDim(4, 32, default=8),
                                                                        ct.RangeDim(4, 32, default=8)))])
    _check_flexible_input(ml, model, (1, 3, 5, 13), (1, 3, 40, 8), r"\(1, 3, 4\.\.32, 4\.\.32\)")


def test_pil_image_input_with_scale_and_bias(net):
    from PIL import Image

    model, _ = net
    x = torch.rand(1, 3, 8, 8)
    ml = _convert(model, x, inputs=[ct.ImageType(name="image", shape=x.shape, scale=1 / 255.0,
                                                 bias=[-0.5, -0.5, -0.5], color_layout=ct.colorlayout.BGR)])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    got = next(iter(EmulatedModel(ml).predict({"image": img}).values()))
    bgr = torch.from_numpy(pixels[..., ::-1].transpose(2, 0, 1).copy()).float()[None]
    want = model(bgr / 255.0 - 0.5).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(EmulatorInputError, match="must be a PIL.Image"):
        EmulatedModel(ml).predict({"image": np.zeros((1, 3, 8, 8))})
    with pytest.raises(EmulatorInputError, match="expected 8x8"):
        EmulatedModel(ml).predict({"image": Image.fromarray(np.zeros((4, 4, 3), np.uint8), "RGB")})
    with pytest.raises(EmulatorInputError, match="needs PIL mode 'RGB'"):
        EmulatedModel(ml).predict({"image": Image.fromarray(np.zeros((8, 8), np.uint8), "L")})


def test_saved_mlpackage_loaded_by_path_gives_same_outputs(net, tmp_path):
    model, x = net
    ml16 = _convert(model, x, compute_precision=ct.precision.FLOAT16)
    path = tmp_path / "net.mlpackage"
    ml16.save(str(path))
    for cu in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"):
        a = EmulatedModel(ml16, cu).predict({"image": x.numpy()})
        b = EmulatedModel(str(path), cu).predict({"image": x.numpy()})
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), cu


def test_neural_network_models_get_a_clear_error(net):
    model, x = net
    nn_model = ct.convert(torch.jit.trace(model, (x,)), inputs=[ct.TensorType(name="image", shape=x.shape)],
                          convert_to="neuralnetwork")
    with pytest.raises(NotAnMLProgramError, match="convert_to='mlprogram'"):
        EmulatedModel(nn_model)


def test_bad_model_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.mlpackage"):
        EmulatedModel(tmp_path / "missing.mlpackage")
    with pytest.raises(TypeError, match="MLModel or a path"):
        EmulatedModel(42)
    from coreml_lab.emulator import get_profile
    with pytest.raises(ValueError, match="unknown compute unit 'TPU'"):
        get_profile("TPU")


def test_unsupported_op_names_type_op_module_and_supported_list(net, monkeypatch):
    model, x = net
    conv = cl.convert(model, (x,), cl.ConversionOptions(precision="fp32"), cache=False)
    registry._load_kernels()
    monkeypatch.delitem(registry._KERNELS, "relu")
    with pytest.raises(UnsupportedOpError) as err:
        EmulatedModel(conv.mlmodel)
    text = str(err.value)
    assert "'relu'" in text and "named" in text and "Supported op types:" in text and "conv" in text
    assert err.value.op_type == "relu" and err.value.op_name


def test_kernel_failure_names_the_op(net, monkeypatch):
    model, x = net
    conv = cl.convert(model, (x,), cl.ConversionOptions(precision="fp32"), cache=False)
    registry._load_kernels()
    k = registry._KERNELS["relu"]

    def broken(call):
        raise RuntimeError("boom")

    monkeypatch.setitem(registry._KERNELS, "relu", registry.Kernel("relu", k.family, broken))
    with pytest.raises(OpExecutionError, match=r"'relu' named .* \(torch module 'conv'\)|'relu' named"):
        EmulatedModel(conv.mlmodel).predict({"image": x.numpy()})


@pytest.mark.slow
def test_supported_ops_covers_sample_models():
    import sample_models
    ops = set(supported_ops())
    for name in sample_models.SAMPLES:
        model, inputs, _ = sample_models.build(name)
        for precision in ("fp16", "fp32"):
            conv = cl.convert(model, inputs, cl.ConversionOptions(precision=precision))
            missing = set(conv.op_types()) - ops
            assert not missing, f"{name} {precision}: {missing}"


def test_a_rank_0_output_comes_back_as_shape_1_like_core_ml(tmp_path):
    # MLMultiArray has no rank 0: Core ML returns a scalar output as shape (1,), and so must the emulator
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.reduce_sum(x=x), mb.reduce_argmax(x=mb.reshape(x=x, shape=[-1])), mb.mul(x=x, y=2.0)

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                    compute_precision=ct.precision.FLOAT32)
    total, argmax, doubled = [o.name for o in ml.get_spec().description.output]
    assert [list(o.type.multiArrayType.shape) for o in ml.get_spec().description.output][:2] == [[], []]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "scalar.mlpackage"
    ml.save(str(path))
    for model in (ml, str(path)):
        for cu in ("CPU_ONLY", "CPU_AND_NE"):
            out = EmulatedModel(model, cu).predict({"x": x})
            assert out[total].shape == (1,) and out[total].dtype == np.float32
            assert out[total][0] == 15.0
            assert out[argmax].shape == (1,) and out[argmax].dtype == np.int32 and out[argmax][0] == 5
            assert out[doubled].shape == (2, 3)
