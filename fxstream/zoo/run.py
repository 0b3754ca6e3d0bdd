"""One zoo row: build a catalogued model and :func:`~fxstream.zoo.check` it under the zoo's two posteriors.

The posteriors:

- ``last-2``: the last two floating parameters in ``named_parameters()`` order
  (usually the head's weight and bias), 2% relative standard deviation. The
  output is (close to) linear in them, so fxstream should match Monte Carlo
  up to its sampling error.
- ``all``: every floating parameter, 2% relative standard deviation. Every op
  of the model then carries covariance; diagonal activations and independent
  residual branches are approximations, so the gap to Monte Carlo is the
  method's, not only sampling's.

Each row is isolated: failures (fxstream's or the library's) become the row's
error, a time limit stops a model that hangs, and memory is freed afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FxstreamError, GraphBreakError, UnsupportedOpError
from .catalogue import Entry
from .harness import ZooResult, check_many, last_parameters, relative_posterior

POSTERIORS: dict[str, Callable[[torch.nn.Module], object]] = {
    "last-2": lambda model: relative_posterior(model, last_parameters(model, 2)),
    "all": lambda model: relative_posterior(model),
}
DEFAULT_SAMPLES = {"last-2": 2000, "all": 400}


class ModelTimeout(BaseException):
    """A model ran past the zoo's per-model time limit (a BaseException, so that the per-posterior
    ``except Exception`` handlers on its way up do not swallow it)."""


@dataclass
class ZooRow:
    """A catalogue entry's outcome: a result or an error per posterior."""

    name: str
    source: str
    family: str = ""
    params: int = 0
    input: str = ""
    dtype: str = ""
    results: dict[str, ZooResult] = field(default_factory=dict)
    errors: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # posterior -> (type, what, message)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Both posteriors ran with exact means and valid variances."""
        return not self.errors and all(r.ok for r in self.results.values()) and len(self.results) == len(POSTERIORS)

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if "build" in self.errors:
            return "build failed: " + self.errors["build"][2]
        parts = []
        for name in POSTERIORS:
            if name in self.errors:
                parts.append(f"{name}: {self.errors[name][2]}")
            elif name in self.results and not self.results[name].means_exact:
                parts.append(f"{name}: mean differs from the forward by {self.results[name].mean_error:.1e} (rel.)")
            elif name in self.results and not self.results[name].variances_valid:
                parts.append(f"{name}: variances not finite or negative")
        return "; ".join(parts)


_RESULT_FIELDS = ("mean_error", "mean_tolerance", "var_finite", "var_nonnegative", "output_shape", "dtype",
                  "uncertain_parameters", "uncertain_numel", "streamline_s", "call_s", "forward_s", "median_error",
                  "p90_error", "mc_samples", "mc_s", "mc_skipped", "var_mean", "median_ratio")


def row_to_dict(row: ZooRow) -> dict:
    """A JSON-ready form of ``row`` (:func:`row_from_dict` reads it back)."""
    results = {name: {key: getattr(r, key) for key in _RESULT_FIELDS} for name, r in row.results.items()}
    for result in results.values():
        result["dtype"] = str(result["dtype"]).removeprefix("torch.")
    return {"name": row.name, "source": row.source, "family": row.family, "params": row.params, "input": row.input,
            "dtype": row.dtype, "seconds": row.seconds, "ok": row.ok, "status": row.status, "results": results,
            "errors": {name: list(error) for name, error in row.errors.items()}}


def row_from_dict(data: dict) -> ZooRow:
    results = {}
    for name, fields in data["results"].items():
        fields = dict({"median_ratio": None}, **fields)
        fields = dict(fields, dtype=getattr(torch, fields["dtype"]), output_shape=tuple(fields["output_shape"]))
        results[name] = ZooResult(**fields)
    return ZooRow(data["name"], data["source"], data["family"], data["params"], data["input"], data["dtype"],
                  results, {name: tuple(error) for name, error in data["errors"].items()}, data["seconds"])


def describe(error: BaseException) -> tuple[str, str, str]:
    """(error type, the op or short cause, first line of the message) of a failure."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kind = type(error).__name__
    if isinstance(error, UnsupportedOpError):
        where = f" in {error.module_path}" if error.module_path else ""
        return kind, error.op, f"{kind}: no rule for {error.op}{where}"
    if isinstance(error, GraphBreakError):
        cause = message.split("Dynamo reports: ", 1)[-1].split(". Rewrite", 1)[0]
        return kind, cause, message
    op, where = _locate(error)
    if isinstance(error, FxstreamError):
        return kind, f"{op or where}: {message}"[:160] if (op or where) else message[:160], f"{kind}: {message}"
    cause = f"{kind} in the rule for {op}" if op else (f"{kind} in {where}" if where else kind)
    detail = f" ({where})" if op and where else ""
    what = f"{op or where}: {message}" if (op or where) else message
    return kind, what[:160], f"{cause}{detail}: {message}"


def _locate(error: BaseException) -> tuple[str | None, str]:
    """Where in fxstream an error arose: the ATen op whose rule ran (if a rule did) and ``path:line
    function`` of the deepest frame in a rule module (else in fxstream, outside the zoo)."""
    package = Path(__file__).resolve().parents[1]
    op, in_rules, anywhere = None, "", ""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = Path(code.co_filename).resolve()
        if package in path.parents and "zoo" not in path.relative_to(package).parts:
            relative = path.relative_to(package).as_posix()
            where = f"fxstream/{relative}:{tb.tb_lineno} {code.co_name}"
            anywhere = where
            if relative.startswith("rules/") and relative != "rules/registry.py":
                in_rules = where
            if relative == "rules/registry.py" and code.co_name == "target" and "op" in tb.tb_frame.f_locals:
                op = str(tb.tb_frame.f_locals["op"])
        tb = tb.tb_next
    return op, in_rules or anywhere


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`ModelTimeout` in the main thread after ``seconds`` (no limit elsewhere or if None)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ModelTimeout(f"ran past the {seconds:g} s limit per model")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_dtype(built, dtype: torch.dtype):
    """The model in ``dtype``; float32 where its own forward fails in float64 (some libraries' masks do)."""
    cast = built.to(dtype)
    if dtype == torch.float32:
        return cast, "float32"
    try:
        with torch.no_grad():
            cast.model(*cast.args, **cast.kwargs)
        return cast, "float64"
    except Exception:  # noqa: BLE001
        return built.to(torch.float32), "float32 (fails in float64)"


def evaluate(entry: Entry, *, samples: dict[str, int] | None = None, mc_seconds: float | None = 15.0,
             min_samples: int = 100, float64_below: int = 5_000_000, backend: str = "eager",
             timeout: float | None = None, posteriors: tuple[str, ...] = tuple(POSTERIORS), repeats: int = 3) -> ZooRow:
    """Build ``entry`` and check it under each posterior; never raises (errors are the row's)."""
    samples = {**DEFAULT_SAMPLES, **(samples or {})}
    row = ZooRow(entry.name, entry.source, entry.family)
    start = time.perf_counter()
    built, current = None, "build"
    try:
        with time_limit(timeout):
            try:
                built = entry.build()
            except ModelTimeout:
                raise
            except Exception as error:  # noqa: BLE001 - a row, not a crash
                row.errors["build"] = describe(error)
                return row
            row.params = sum(p.numel() for p in built.model.parameters())
            built, row.dtype = _in_dtype(built, torch.float64 if row.params <= float64_below else torch.float32)
            row.input = built.note
            current = "+".join(posteriors)
            made = {name: POSTERIORS[name](built.model) for name in posteriors}
            outcomes = check_many(built.model, built.args, made, example_kwargs=built.kwargs, output=built.output,
                                  samples=samples, mc_seconds=mc_seconds, min_samples=min_samples, backend=backend,
                                  repeats=repeats)
            made = None
            for name, outcome in outcomes.items():
                if isinstance(outcome, BaseException):
                    row.errors[name] = describe(outcome)
                else:
                    row.results[name] = outcome
    except ModelTimeout as error:
        for name in current.split("+"):
            if name not in row.results:
                row.errors[name] = describe(error)
    except Exception as error:  # noqa: BLE001 - e.g. the model's own forward fails: every posterior
        for name in posteriors:
            row.errors.setdefault(name, describe(error))
    finally:
        built = None
        torch._dynamo.reset()
        gc.collect()
        row.seconds = time.perf_counter() - start
    return row
