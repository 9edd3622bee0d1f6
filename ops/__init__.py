"""Definitions of qcompile's custom operators: schemas, numpy reference semantics, decomposed fallbacks.

Empty until the INT4 / NF4 / LLM.int8() lowerings land; the kernels in `custom_kernels/` are tested
against the references that will live here.
"""
