"""Which run-log keys a tracker receives: ``keys="totals" | "all" | [patterns] | callable``.

* ``"totals"`` (the default of every tracker sink): one value per quantity and its own sub-values
  (``grad_norm``, ``loss``, ``alpha``, ``hess_trace/stderr``, ``time/cockpit``), without the
  per-parameter values (``grad_norm/<parameter name>``); a 2-layer BERT with the ``full`` preset then
  sends 18 series instead of 346;
* ``"all"``: every scalar value of the record;
* a list of ``fnmatch`` patterns (``["loss", "grad_norm*", "alpha"]``): the keys matching one;
* a callable ``key -> bool``.

A key ``<quantity>/<rest>`` is per-parameter when ``<rest>`` is the name of an observed parameter
(the run's header lists them; the cockpit passes the header to a sink's ``open_run``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Collection, Iterable, Union

KeySpec = Union[str, Iterable[str], Callable[[str], bool]]


def per_parameter(key: str, parameter_names: Collection[str]) -> bool:
    """Whether ``key`` is the value of one parameter (``<quantity>/<parameter name>``)."""
    _, sep, rest = key.partition("/")
    return bool(sep) and rest in parameter_names


def key_filter(spec: KeySpec = "totals") -> Callable[[str, Collection[str]], bool]:
    """``(key, parameter names) -> bool`` for ``spec`` (see the module docstring)."""
    if spec == "totals":
        return lambda key, names: not per_parameter(key, names)
    if spec == "all":
        return lambda key, names: True
    if callable(spec):
        return lambda key, names: bool(spec(key))
    if isinstance(spec, str):
        raise ValueError(f"keys must be 'totals', 'all', a list of patterns or a callable, got {spec!r}")
    patterns = list(spec)
    return lambda key, names: any(fnmatch.fnmatchcase(key, p) for p in patterns)


def parameter_names(header: Any) -> frozenset:
    """The observed parameters' names in a run-log header."""
    params = header.get("params") if isinstance(header, dict) else None
    return frozenset(p.get("name") for p in params or () if isinstance(p, dict) and p.get("name"))


def path_safe(metrics: dict, prefix: str) -> dict:
    """``metrics`` with the sub-key separator after ``prefix`` written as ".": ``cockpit/alpha/stderr`` ->
    ``cockpit/alpha.stderr``. For stores that keep a metric named ``a/b`` as the file ``b`` in a folder ``a``
    (MLflow's file store), where ``cockpit/alpha`` (a file) and ``cockpit/alpha/stderr`` (a file inside a
    folder of the same name) cannot both exist: the second failed and the sink was detached."""
    n = len(prefix)
    return {(k[:n] + k[n:].replace("/", ".")) if k.startswith(prefix) else k: v for k, v in metrics.items()}
