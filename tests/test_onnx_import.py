"""ONNX import through onnx2torch (run by `make test-onnx-import`, whose venv has the extra)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab.sources import export_onnx, load_source

pytestmark = pytest.mark.onnx_import


def _ort(path, inputs):
    sess = ort.InferenceSession(str(path))
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})


@pytest.mark.parametrize("kind, bidirectional, batch_first, layers", [
    ("GRU", False, True, 1), ("GRU", True, False, 2), ("LSTM", False, True, 1), ("LSTM", True, True, 2),
])
def test_recurrent_nodes_import_like_onnxruntime(tmp_path, kind, bidirectional, batch_first, layers):
    torch.manual_seed(0)
    cls = torch.nn.GRU if kind == "GRU" else torch.nn.LSTM

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(6, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)

        def forward(self, x):
            return self.rnn(x)[0]

    model = Wrap().eval()
    x = torch.randn(2, 7, 6) if batch_first else torch.randn(7, 2, 6)
    path = export_onnx(model, (x,), tmp_path / "rnn.onnx")
    src, inputs = load_source(path, (x,))
    with torch.no_grad():
        got = src.reference(*inputs.tensors)
    (want,) = _ort(path, (x,))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_asr_sample_converts_from_onnx_and_matches_onnxruntime(tmp_path):
    model, inputs, _ = sample_models.build("asr_onnx")
    path = sample_models.asr_onnx.export_onnx(tmp_path / "asr.onnx")
    conv = cl.convert(path, inputs, cl.ConversionOptions(precision="fp32"))
    assert conv.source_kind == "onnx" and conv.method == "onnx2torch+torch.jit.trace"
    assert conv.onnx_path == path and path.exists(), "the ONNX intermediate is kept"
    from coreml_lab.emulator import EmulatedModel
    (want,) = _ort(path, inputs)
    got = EmulatedModel(conv.mlmodel, "CPU_ONLY").predict(conv.example_inputs.as_numpy())
    np.testing.assert_allclose(list(got.values())[0], want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(model(*inputs).numpy(), want, rtol=1e-4, atol=1e-4)


def test_unsupported_recurrent_attribute_is_refused_clearly(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    h, i = 3, 2
    w = helper.make_tensor("W", TensorProto.FLOAT, [1, 3 * h, i], np.zeros(9 * 2, np.float32))
    r = helper.make_tensor("R", TensorProto.FLOAT, [1, 3 * h, h], np.zeros(27, np.float32))
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y"], hidden_size=h, linear_before_reset=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 1, i])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=[w, r])
    path = tmp_path / "gru.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    with pytest.raises(NotImplementedError, match="linear_before_reset=0"):
        load_source(path, (torch.zeros(4, 1, i),))
