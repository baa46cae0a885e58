"""What ``npmobile verify`` finds, as data: the tolerances (defined here once; the parity tests import them), how
far one engine is from another on a layer, the report's rows, the verdict and what its exit status means."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The parity tolerances: probabilities absolutely, feature maps (and logits) relative to their range.
PROBABILITY_ATOL = 5e-5
FEATURE_RTOL = 1e-4
EXIT_OK, EXIT_BEYOND, EXIT_USAGE, EXIT_COULD_NOT_RUN = 0, 1, 2, 3


class CouldNotRun(Exception):
    """Something outside npmobile's control stopped the comparison: Keras cannot load the file, the user's module
    does not import."""


class UsageProblem(Exception):
    """An option that cannot be used as given."""


@dataclass
class Difference:
    """How far one engine's values are from another's on one layer (or the final output)."""

    max_abs: float = 0.0
    rel: float = 0.0  # max |diff| / max(1, max |reference|): the quantity the feature-map tolerance bounds
    tolerance: float = 0.0  # in max |diff| units
    ok: bool = True
    worst: float = 0.0  # max |diff| / tolerance over the inputs

    def add(self, got: np.ndarray, reference: np.ndarray) -> None:
        got, reference = np.asarray(got, np.float64), np.asarray(reference, np.float64)
        if got.shape != reference.shape:
            self.ok, self.worst, self.max_abs = False, float("inf"), float("inf")
            return
        diff = float(np.abs(got - reference).max()) if got.size else 0.0
        scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
        tolerance = PROBABILITY_ATOL if is_probability(reference) else FEATURE_RTOL * scale
        ratio = diff / tolerance if np.isfinite(diff) else float("inf")
        self.max_abs, self.rel = max(self.max_abs, diff), max(self.rel, diff / scale)
        if ratio >= self.worst:
            self.worst, self.tolerance = ratio, tolerance
        self.ok = self.ok and bool(diff <= tolerance)

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "rel": self.rel, "tolerance": self.tolerance, "ok": self.ok}


@dataclass
class LayerRow:
    name: str
    class_name: str
    shape: tuple
    versus: Difference = field(default_factory=Difference)  # npmobile (unfused fast kernels) vs the reference side
    npmobile_f64: Difference = field(default_factory=Difference)
    reference_f64: Difference = field(default_factory=Difference)

    def as_dict(self) -> dict:
        return {"name": self.name, "class": self.class_name, "shape": list(self.shape), **self.versus.as_dict(),
                "npmobile_vs_float64": self.npmobile_f64.max_abs, "reference_vs_float64": self.reference_f64.max_abs}


def is_probability(values: np.ndarray) -> bool:
    """[batch, classes] rows of non-negative values summing to 1 (a softmax output)."""
    return bool(values.ndim == 2 and values.shape[1] > 1 and values.min() >= 0
                and np.allclose(values.sum(axis=1), 1, atol=1e-3))


def top5_agreement(got: np.ndarray, reference: np.ndarray, logits: bool = False) -> str:
    """"yes", "yes (ties ...)" when the orders differ only between classes the reference scores within the
    tolerance of each other (probabilities: 5e-5; ``logits``: 1e-4 x max(1, max|reference|)), "no", or "n/a"
    for outputs that are neither."""
    if got.shape != reference.shape or reference.ndim != 2 or reference.shape[1] < 5:
        return "n/a"
    if logits:
        tie = FEATURE_RTOL * max(1.0, float(np.abs(reference).max()))
    elif is_probability(reference):
        tie = PROBABILITY_ATOL
    else:
        return "n/a"
    ties = []
    for n in range(got.shape[0]):
        ours = np.argsort(-got[n], kind="stable")[:5]
        theirs = np.argsort(-reference[n], kind="stable")[:5]
        for rank, (a, b) in enumerate(zip(ours, theirs)):
            if a == b:
                continue
            if abs(float(reference[n, a]) - float(reference[n, b])) > tie:
                return "no"
            ties.append(f"input {n} rank {rank + 1}")
    return "yes" if not ties else f"yes (tied within {tie:.2g} at {', '.join(ties)})"


@dataclass
class FinalOutput:
    """The final output of the fast, fused path ``predict`` uses, against the reference side's."""

    versus: Difference = field(default_factory=Difference)
    top5_agree: str = "n/a"  # top5_agreement's answer
    path: str = "predict (fast, fused)"

    def as_dict(self) -> dict:
        return {**self.versus.as_dict(), "top5_agree": self.top5_agree, "path": self.path}


@dataclass
class VerifyReport:
    """Everything verify found: the CLI prints it as text, and ``as_dict()`` is what ``--json`` prints.

    ``ok`` is the verdict: every compared layer and the final output within tolerance, and the top-5 not
    disagreeing; ``exit_status`` is what the CLI exits with for it (EXIT_OK or EXIT_BEYOND)."""

    model: str
    model_name: str
    writer: str  # who wrote the file: "Keras 3", "Keras 2 / tf_keras", "PyTorch, ..."
    inputs: str  # what was run: the images, or the seeded random inputs
    reference: str  # the side's label
    reference_detail: str
    notes: list[str]
    layers: list[LayerRow]
    skipped_layers: list[str]
    final: FinalOutput
    float64: dict[str, float]  # each engine's max |diff| from npmobile's float64 reference, on the final output

    @property
    def first_layer_beyond_tolerance(self) -> str | None:
        return next((row.name for row in self.layers if not row.versus.ok), None)

    @property
    def ok(self) -> bool:
        return self.final.versus.ok and self.first_layer_beyond_tolerance is None and self.final.top5_agree != "no"

    @property
    def exit_status(self) -> int:
        return EXIT_OK if self.ok else EXIT_BEYOND

    def as_dict(self) -> dict:
        return {"model": self.model, "model_name": self.model_name, "writer": self.writer, "inputs": self.inputs,
                "reference": self.reference, "reference_detail": self.reference_detail, "notes": list(self.notes),
                "layers": [row.as_dict() for row in self.layers], "skipped_layers": list(self.skipped_layers),
                "first_layer_beyond_tolerance": self.first_layer_beyond_tolerance, "final": self.final.as_dict(),
                "float64": dict(self.float64), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict) -> VerifyReport:
        """The report back from its ``as_dict()`` (a ``--json`` file read back)."""
        def difference(values: dict) -> Difference:
            return Difference(max_abs=values["max_abs"], rel=values["rel"], tolerance=values["tolerance"],
                              ok=values["ok"])

        rows = [LayerRow(row["name"], row["class"], tuple(row["shape"]), versus=difference(row),
                         npmobile_f64=Difference(max_abs=row["npmobile_vs_float64"]),
                         reference_f64=Difference(max_abs=row["reference_vs_float64"])) for row in data["layers"]]
        final = FinalOutput(difference(data["final"]), data["final"]["top5_agree"], data["final"]["path"])
        plain = {k: data[k] for k in ("model", "model_name", "writer", "inputs", "reference", "reference_detail",
                                      "notes", "skipped_layers", "float64")}
        return cls(**plain, layers=rows, final=final)
