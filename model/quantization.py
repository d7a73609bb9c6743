"""Moved to :mod:`transact.data.quantization` (the int8 copy ``emb_q`` is part of the
event schema, so the rule that makes it lives with the schema). This re-export stays for
one release (see CHANGELOG.md)."""
from transact.data.quantization import MAX_ERROR, QMAX, SCALE, STEP, dequantize, quantize  # noqa: F401
