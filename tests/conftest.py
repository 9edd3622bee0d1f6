import os

# Every pipeline run in the tests checks the ONNX checker and our invariants after each pass.
os.environ["QCOMPILE_VERIFY_EACH"] = "1"
