"""What every quantizing recipe does with embedding tables: the `embeddings` option and its passes."""
from __future__ import annotations

import onnx_ir as ir

from qcompile.passes.analysis.assign_embedding_specs import AssignEmbeddingSpecsPass, EmbeddingSpecOptions
from qcompile.passes.fusion.gather_quantized_rows import GatherQuantizedRowsPass
from qcompile.passes.transform.materialize_transposed_weights import (MaterializeOptions,
                                                                      MaterializeTransposedWeightsPass)
from qcompile.recipes.base import Settings, option


def embeddings_option():
    return option(True, "store the tables of embedding Gathers as INT8, one scale per row")


def assign_embedding_specs(settings: Settings, block_size: int | None = None,
                           symmetric: bool = True) -> list[ir.passes.PassBase]:
    """``block_size``: 4-bit blocks along the rows instead of INT8 rows (`lower-gather-block-quantized`)."""
    options = EmbeddingSpecOptions(settings.excluded, block_size, symmetric)
    return [AssignEmbeddingSpecsPass(options)] if settings.options.embeddings else []


def untie(settings: Settings) -> list[ir.passes.PassBase]:
    """A head tied to the embedding gets its own (quantized) weight, so both tables can be quantized."""
    return [MaterializeTransposedWeightsPass(MaterializeOptions(settings.excluded))]


def gather_rows(settings: Settings) -> list[ir.passes.PassBase]:
    return [GatherQuantizedRowsPass()] if settings.options.embeddings else []
