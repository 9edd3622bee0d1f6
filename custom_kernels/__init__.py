"""Sources of qcompile's ONNX Runtime custom-op library (C++, CMake), built by `qcompile kernels build`."""
