#!/usr/bin/env python
"""INT4 benchmark: qcompile's 4-bit weight-only recipes next to ONNX Runtime's `MatMulNBitsQuantizer`, in one run.

    .venv/bin/python benchmarks/int4.py [--models minilm,smollm2] [--quick] [--configs PATTERN,...]

The harness of the INT8 benchmark (`int8.py`: data, child processes under a memory cap, evaluation against
fp32, interleaved latency), with the INT4 configurations (`int8.int4_configurations`). Results:
``benchmarks/results/int4-<date>-<machine>[-quick].json`` and ``.md``.
"""
import sys

import int8

if __name__ == "__main__":
    sys.exit(int8.main(family="int4"))
