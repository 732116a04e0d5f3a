"""vramplan: will this model fit, for this job, on this hardware?

The core is pure Python: no torch, numpy or network at import time.

``list_models()`` lists every model ``estimate`` takes by name, language and image models alike (what
``vramplan models`` prints: :class:`ModelInfo` rows with a ``kind``); ``get_model`` and ``resolve_model`` are the
language-model catalog's entries and specs (``vramplan.catalog.list_models()`` lists those entries alone).
"""

from __future__ import annotations

from .api import estimate, make_workload
from .catalog import CatalogEntry, get_model, resolve_model
from .errors import ConfigError, UnknownNameError, VramplanError, WorkloadError
from .hfconfig import SUPPORTED_MODEL_TYPES, load_config_file, spec_from_config
from .kinds import MemoryKind, Phase
from .params import count_params
from .result import Breakdown, Estimate, PhasePeak
from .service import ModelInfo
from .service import models as list_models
from .spec import ModelSpec
from .workload import Attention, LogitsMode, Method, Optimizer, Precision, Task, WeightsQuant, Workload

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "Breakdown",
    "CatalogEntry",
    "ConfigError",
    "Estimate",
    "LogitsMode",
    "MemoryKind",
    "Method",
    "ModelInfo",
    "ModelSpec",
    "Optimizer",
    "Phase",
    "PhasePeak",
    "Precision",
    "Task",
    "UnknownNameError",
    "VramplanError",
    "WeightsQuant",
    "Workload",
    "WorkloadError",
    "__version__",
    "count_params",
    "estimate",
    "get_model",
    "list_models",
    "load_config_file",
    "make_workload",
    "resolve_model",
    "spec_from_config",
]
