"""Training data's reading and encoding live in nora.tasks.data; kept here for older imports."""

from ..tasks.data import (
    IGNORE,
    Encoded,
    causal_kind,
    encode_causal,
    encode_classification,
    encode_regression,
    load_records,
    pad_inputs,
    pad_token_labels,
    split_eval,
)

__all__ = ["IGNORE", "Encoded", "causal_kind", "encode_causal", "encode_classification", "encode_regression",
           "load_records", "pad_inputs", "pad_token_labels", "split_eval"]  # fmt: skip
