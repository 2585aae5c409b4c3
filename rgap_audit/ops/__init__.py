"""Per-operation knowledge, one module per family, keyed by operation.

    base         OpInfo, the table OPS, register / lookup, kinds and field values
    weighted     Linear, Conv, ConvTranspose (module, functional, aten, x @ W)
    activations  elementwise activations and softmax: inverses, clip ranges
    norms        BatchNorm (per-channel affine, gamma rows), LayerNorm, GroupNorm, ...
    shapes       identities, reshapes, permutations
    pools        pooling, reductions, indexing
    merges       sums, concatenations, products; constant shifts and scalings
    embeddings   token ids -> table rows, and the token set their gradient reveals
    unsupported  weighted layers not decomposed yet, with the reason
    io           the input and the output
    wrappers     the call-site functions tracing.py rewrites ambiguous calls to

Supporting a new operation means adding one `register(OpInfo(...), targets...)` call to the family
it belongs to. The walk, the attack, the tracer and the loader read these fields and never test
module classes or op names themselves (tests/test_ops_boundary.py checks that). An operation with no
entry is reported as not understood and never counted as safe.
"""

from rgap_audit.ops import activations, attention, embeddings, merges, norms, pools, shapes, unsupported, weighted, wrappers
from rgap_audit.ops.base import (
    ACTIVATION,
    ADD,
    AFFINE,
    CLIP,
    CONSTANT,
    CUT,
    DIV,
    EMBEDDING,
    FROM_INPUT,
    FROM_OUTPUT,
    IDENTITY,
    INVERT,
    IO,
    KINDS,
    LAYER,
    LOSSY,
    MATMUL,
    MERGE,
    MUL,
    NORM,
    NOT_UNDERSTOOD,
    OPS,
    PASS,
    PERMUTE,
    POOL,
    REORDER,
    RESHAPE,
    SEGMENT,
    SLICE,
    SUB,
    UNKNOWN,
    Leak,
    LeakContext,
    OpInfo,
    ParamRows,
    check_model,
    lookup,
    numel,
    register,
    registered_module,
)
from rgap_audit.ops.io import INPUT, OUTPUT

__all__ = [
    "ACTIVATION", "ADD", "AFFINE", "CLIP", "CONSTANT", "CUT", "DIV", "EMBEDDING", "FROM_INPUT", "FROM_OUTPUT",
    "IDENTITY", "INPUT", "INVERT", "IO", "KINDS", "LAYER", "LOSSY", "MATMUL", "MERGE", "MUL", "NORM",
    "NOT_UNDERSTOOD", "OPS", "OUTPUT", "PASS", "PERMUTE", "POOL", "REORDER", "RESHAPE", "SEGMENT", "SLICE", "SUB", "UNKNOWN",
    "Leak", "LeakContext", "OpInfo", "ParamRows", "activations", "attention", "check_model", "embeddings", "lookup", "merges", "norms",
    "numel", "pools", "register", "registered_module", "shapes", "unsupported", "weighted", "wrappers",
]
