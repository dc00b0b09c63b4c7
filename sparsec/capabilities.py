"""What a pass can do beyond ``match``/``rewrite``, declared as protocols.

Core asks ``isinstance(pass_, Capability)`` instead of probing attributes one by one: each
protocol is one capability with its whole contract (``passes/README.md`` documents them).
A pass has a capability by defining its methods; subclassing ``sparsec.Pass`` gives the
optional ones as concrete no-ops (``check_entry``, ``report_row``)."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["Calibrated", "HistogramCalibration", "ModelCalibration", "PrunesWeights", "ScoresOnModel",
           "needs_calibration"]


@runtime_checkable
class Calibrated(Protocol):
    """The pass decides something from data for some configs (thresholds, masks)."""

    def needs_calibration(self, config: Any) -> bool: ...


@runtime_checkable
class HistogramCalibration(Protocol):
    """Calibrated from histograms of graph values that core records at probe nodes."""

    def probes(self, ctx: Any, sites: list, config: Any) -> dict: ...

    def plan_entries(self, sites: list, config: Any, hists: dict, scorer: Callable | None) -> dict: ...


@runtime_checkable
class ModelCalibration(Protocol):
    """Calibrates by running the eager model itself (SparseGPT), or one captured graph."""

    def calibrate_model(self, model: Any, sites: list, config: Any, batches: list, progress: bool) -> tuple: ...

    def calibrate_graph(self, ctx: Any, sites: list, config: Any, example_inputs: list) -> tuple: ...


@runtime_checkable
class PrunesWeights(Protocol):
    """Its plan replaces weights: later passes of the recipe calibrate on the pruned model."""

    def pruned_weights(self, entries: dict, tensors: dict) -> dict: ...


@runtime_checkable
class ScoresOnModel(Protocol):
    """Scores its choices on the model during ``sparsec.calibrate`` (TEAL's greedy allocation):
    how many batches to hold out from the histograms, and how a site's value acts on its input
    (``None``: this config scores nothing)."""

    def held_out_batches(self, config: Any) -> int: ...

    def scorer_transform(self, config: Any) -> Callable | None: ...


def needs_calibration(p: Any, config: Any) -> bool:
    return isinstance(p, Calibrated) and bool(p.needs_calibration(config))
