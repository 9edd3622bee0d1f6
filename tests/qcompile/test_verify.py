import onnx
import onnx_ir as ir

from qcompile.verify import _readers


def test_the_readers_of_a_quantized_tensor_are_found_past_reshapes_and_transposes_not_its_float_readers():
    model = ir.serde.deserialize_model(onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 8] x, float[4, 2] k) => (float[2, 2, 2] y, float[2, 8] z, float[2, 8] f)
          <float s = {0.1}, uint8 zp = {128}, int64[3] shape = {2, 2, 4}> {
            q = QuantizeLinear (x, s, zp)
            d = DequantizeLinear (q, s, zp)
            r = Reshape (d, shape)
            t = Transpose <perm = [1, 0, 2]> (r)
            y = MatMul (t, k)
            z = Relu (d)
            f = Sigmoid (x)
        }"""))
    for node in model.graph:
        node.name = {"MatMul": "attention", "Relu": "relu"}.get(node.op_type, node.op_type)
    assert sorted(_readers(model.graph.inputs[0])) == ["attention", "relu"]  # not the Sigmoid of x itself
