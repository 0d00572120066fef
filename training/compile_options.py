"""XLA compile options for programs that run once or a few times per run.

Most of a small program's compile time on the CPU goes to XLA's fusion emitters,
which generate its fused kernels. A program that runs once (a model's
initialisation) or a handful of times (evaluations, the probe's L-BFGS fits) is
compiled without them: about half the compile time for a run time that changes
by a few milliseconds either way (BENCHMARKS.md, "Whole studies"). Compilation
is about 40% of `report.py --quick`.

A train chunk runs thousands of steps and keeps XLA's defaults: without the
emitters the 2-layer RNN's chunk took four times as long to compile.
"""

from __future__ import annotations

from typing import Any

import jax


def rarely_run(**options: Any) -> dict[str, Any]:
    """`options` plus what makes a rarely run program compile faster on this backend
    (nothing is added on a GPU or TPU, whose compilers do not have the option)."""
    if jax.default_backend() == "cpu":
        options["xla_cpu_use_fusion_emitters"] = False
    return options
