"""Loading checks and atomic, non-destructive writes."""

import onnx
import pytest
from graphs import Builder, tiny_vgg

from onnxprune.errors import ModelError, OutputError
from onnxprune.io import default_opset, load_model, save_model_atomic


def test_round_trip_and_no_leftovers(tmp_path):
    path = save_model_atomic(tiny_vgg(), tmp_path / "m.onnx")
    assert load_model(path).graph.node
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_refuses_to_overwrite_input_or_existing(tmp_path):
    path = save_model_atomic(tiny_vgg(), tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="input model"):
        save_model_atomic(tiny_vgg(), path, force=True, protected=(path,))
    with pytest.raises(OutputError, match="--force"):
        save_model_atomic(tiny_vgg(), path)
    save_model_atomic(tiny_vgg(), path, force=True)


@pytest.mark.parametrize("content,msg", [(b"", "not a valid ONNX|no graph"), (b"\x08\x07garbage\xff\xff", "not a valid ONNX|no graph")])
def test_garbage_files(tmp_path, content, msg):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=msg):
        load_model(p)


def test_truncated_model(tmp_path):
    data = tiny_vgg().SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        load_model(p)


def test_old_opset_is_converted_and_missing_file(tmp_path):
    b = Builder(opset=9)
    b.node("Relu", [b.conv("input", 3, 4)])
    model = b.build(b.nodes[-1].output[0])
    p = tmp_path / "old.onnx"
    onnx.save(model, p)
    assert default_opset(load_model(p)) == 11
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="not a file"):
        load_model(tmp_path)


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    model = tiny_vgg()
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(model, inner / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    loaded = load_model(inner / "m.onnx")
    assert len(loaded.graph.initializer) == len(model.graph.initializer)
    evil = onnx.load(inner / "m.onnx", load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    (tmp_path / "w.bin").write_bytes((inner / "w.bin").read_bytes())
    onnx.save(evil, inner / "evil.onnx")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(inner / "evil.onnx")
