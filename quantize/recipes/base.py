"""The recipe interface: how one converted float model becomes one variant.

Most recipes transform the float ``.tflite``; an ``onnx`` recipe (``artifact_format``
``"onnx"``) transforms the float ``.onnx`` exported from the same torch model instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["Recipe", "Thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """How far an artifact may disagree with its torch reference and still ship.

    Attributes:
        max_abs_error: Largest allowed |artifact - reference| over every class
            probability (softmax of the logits the zoo's models emit). Probabilities are
            scale-free, and unlike raw logits they do not punish int8's clipping of
            extreme logits that cannot change an answer.
        min_top1_agreement: Share of samples whose arg-max must match the reference.
        max_accuracy_drop: Largest allowed accuracy loss vs the reference, in points.
    """

    max_abs_error: float
    min_top1_agreement: float
    max_accuracy_drop: float

    def to_dict(self) -> dict[str, float]:
        """JSON-able form for the manifest."""
        return asdict(self)


class Recipe(ABC):
    """One quantization recipe. Subclasses live one per file and register by ``key``."""

    key: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # True when every model input and output must be int8 (integer-only accelerators).
    integer_io: ClassVar[bool] = False
    # The file format the recipe reads and writes: "tflite" or "onnx" (which also names
    # the artifact's suffix and the runtimes it is verified on).
    artifact_format: ClassVar[str] = "tflite"
    thresholds: ClassVar[Thresholds]

    @abstractmethod
    def apply(
        self,
        fp32_model: Path,
        out: Path,
        calibration: npt.NDArray[np.float32] | None,
    ) -> None:
        """Write the variant of ``fp32_model`` to ``out``.

        Args:
            fp32_model: The converted float model (in ``artifact_format``).
            out: Where to write the variant.
            calibration: Representative inputs, batch first; required when
                ``needs_calibration`` is true.
        """
