"""mixq: mixed-precision post-training quantization.

    import mixq
    result = mixq.quantize("path/to/model", None, mixq.QuantizeConfig(budget=mixq.Budget(bits=3.0)), out="out/q3")
    model = mixq.load("out/q3")

A sentence encoder (BERT) loads the same way; `mixq.encode(model, tokenizer, sentences)` gives what
`SentenceTransformer.encode` gives (the folder's pooling and normalisation).
"""
__version__ = "0.1.0"

from .config import Calibration, QuantizeConfig  # noqa: E402
from .eval.fidelity import encode  # noqa: E402
from .io import load  # noqa: E402
from .pipeline import Result, quantize  # noqa: E402
from .plan import Budget, Candidate, Plan  # noqa: E402

__all__ = ["Budget", "Calibration", "Candidate", "Plan", "QuantizeConfig", "Result", "encode", "load", "quantize"]
