import onnx
import onnx_ir as ir

from qcompile.layers import layer_precisions


def test_a_product_of_two_activations_is_not_reported_as_a_weighted_layer():
    text = """<ir_version: 10, opset_import: ["" : 17]>
        g (float[4, 8] x, float[8, 4] y) => (float[4, 4] scores, float[4, 2] projected)
        <float[2, 8] w = {1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8},
         int8[8, 4] q = {1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8},
         float s = {0.1}> {
            k = DequantizeLinear (q, s)
            scores = MatMul (x, k)
            wt = Transpose <perm = [1, 0]> (w)
            projected = MatMul (x, wt)
            attention = MatMul (x, y)
        }"""
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    rows = [row["precision"] for row in layer_precisions(model)]
    assert rows == ["w:int8 a:fp32", "w:fp32 a:fp32", "a:fp32 x a:fp32"]


def test_an_image_cast_from_uint8_and_scaled_is_an_activation_not_a_stored_weight():
    text = """<ir_version: 10, opset_import: ["" : 17]>
        g (uint8[1, 1, 4, 4] image) => (float[1, 1, 4, 4] y)
        <float scale = {0.00392}, int8[1, 1, 1, 1] q = {3}, float[1, 1, 1, 1] s = {0.5}> {
            pixels = Cast <to = 1> (image)
            x = Mul (pixels, scale)
            qf = Cast <to = 1> (q)
            w = Mul (qf, s)
            y = Conv (x, w)
        }"""
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    assert [row["precision"] for row in layer_precisions(model)] == ["w:int8 a:fp32"]
