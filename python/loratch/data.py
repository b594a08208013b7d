"""``loratch.inspect_data``: the data inspector of ``loratch data``. It tokenizes the training
data exactly as the trainer does (chat template, loss masks, truncation, packing) and reports
what would be trained, with the warnings ``loratch train`` prints too."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TypedDict

from loratch._loratch import _inspect_data
from loratch.trainer import _check_finite, _jsonable

__all__ = ["DataReport", "DataSample", "DataWarning", "inspect_data"]


class DataSample(TypedDict):
    """One example as trained."""

    record: int
    """Its 1-based record number in the data file."""
    tokens: int
    target_tokens: int
    truncated: bool
    spans: list[tuple[str, bool]]
    """The decoded text in runs, ``(text, trained)``."""
    marked: str
    """The text with the trained runs between ``⟦`` and ``⟧``."""


class DataWarning(TypedDict):
    """A problem training would not report."""

    kind: str
    """``eos_never_trained``, ``no_assistant_part``, ``no_target_after_truncation`` or
    ``doubled_bos``."""
    message: str


class DataReport(TypedDict):
    """What ``inspect_data`` returns. Counts are over every record of ``data``; ``rows``,
    ``batches`` and ``padding_fraction`` over the training part's first epoch."""

    source: str
    max_seq_length: int
    records: int
    examples: int
    tokens: int
    target_tokens: int
    truncated: int
    no_target_after_truncation: int
    without_target: int
    eos_targets: int
    doubled_bos: int
    assistant_missing: int
    train_examples: int
    validation_examples: int
    packing: str
    batches: int
    rows: int
    padding_fraction: float
    samples: list[DataSample]
    warnings: list[DataWarning]
    text: str
    """The report as ``loratch data`` prints it (without colour)."""


def inspect_data(
    config: Mapping[str, Any] | str | os.PathLike[str], *, show: int = 3, verbose: bool = False
) -> DataReport:
    """Inspects the training data of ``config`` as the trainer would see it.

    ``config``: the dict ``loratch.train`` takes, or the path of a config file. Only ``model``
    (for its tokenizer), ``data``, ``validation_data``/``validation_split``, ``seed`` and the
    ``training`` keys ``max_seq_length``, ``train_on_inputs``, ``packing`` and ``batch_size``
    matter. Nothing is printed unless ``verbose`` (then the report's ``text`` goes to stderr);
    the first ``show`` examples are rendered in ``samples``.
    """
    if isinstance(config, Mapping):
        _check_finite(config, "")
        text = json.dumps(config, default=_jsonable, allow_nan=False)
        result = _inspect_data(config_json=text, show=show)
    elif isinstance(config, (str, os.PathLike)):
        result = _inspect_data(config_path=config, show=show)
    else:
        raise TypeError(
            f"loratch.inspect_data: config must be a dict or a path, got {type(config).__name__}"
        )
    report: DataReport = result  # type: ignore[assignment]
    if verbose:
        print(report["text"], end="", file=sys.stderr)
    return report
