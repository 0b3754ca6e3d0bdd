"""The model zoo: fxstream checked on architectures nobody here wrote.

:func:`check` is a public tool: hand it any model, example inputs and a
posterior, and it reports whether the predictive means equal the model's
forward, whether the variances are valid, how far they are from Monte Carlo
over the same posterior, and what the pass costs. :mod:`fxstream.zoo.catalogue`
builds the zoo's models from torchvision, timm and Hugging Face transformers
(optional libraries, imported only when a catalogue is asked for).
"""

from .harness import (
    LinearisedMonteCarlo,
    MonteCarlo,
    ZooResult,
    check,
    check_many,
    last_parameters,
    relative_errors,
    relative_posterior,
    relative_variance,
    select_output,
)

__all__ = [
    "LinearisedMonteCarlo",
    "MonteCarlo",
    "ZooResult",
    "check",
    "check_many",
    "last_parameters",
    "relative_errors",
    "relative_posterior",
    "relative_variance",
    "select_output",
]
