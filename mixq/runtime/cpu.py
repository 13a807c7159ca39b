"""The CPU kernel (csrc/qgemv.cpp): x · Wᵀ for a few rows of x straight from the packed codes. Compiled on first
use through torch.utils.cpp_extension (g++, a minute once; cached under ~/.cache/torch_extensions); where that
fails, or with MIXQ_KERNEL=0, `kernel()` is None and QuantLinear dequantizes instead (the reference path)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "qgemv.cpp"
_state: dict = {}
# no -ffast-math, and no fused multiply-add but the kernel's own: `dequant` must round as the reference does
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]


def kernel():
    """The compiled module (its `qgemv`, `dequant` and `hgemv`), or None."""
    if os.environ.get("MIXQ_KERNEL", "1") == "0":
        return None
    if "module" not in _state:
        _state["module"] = None
        try:
            from torch.utils.cpp_extension import load

            try:  # the pip-installed ninja, also when its venv's bin folder is not on PATH
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass

            from torch.utils.cpp_extension import _get_build_directory

            if not list(Path(_get_build_directory("mixq_qgemv", False)).glob("*.so")):
                print("mixq: building the CPU kernel (once, about a minute)", file=sys.stderr, flush=True)
            _state["module"] = load(name="mixq_qgemv", sources=[str(_SOURCE)],
                                    extra_cflags=CFLAGS, verbose=False)
        except Exception as e:  # no compiler, no headers: the reference path still works
            log.warning("mixq's CPU kernel could not be built (%s); QuantLinear dequantizes instead",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return _state["module"]
