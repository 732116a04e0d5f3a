"""Time and cost: how long a workload runs on a GPU, and what the GPU-hours cost.

The package is split by concern:

* :mod:`~vramplan.perf.work` — FLOPs and bytes a step must do (GPU-independent);
* :mod:`~vramplan.perf.efficiency` — achievable fractions of each GPU's peaks, engine profiles and the
  calibrated coefficients, as data with sources (``data/mfu.json``);
* :mod:`~vramplan.perf.timing` — seconds of a training step, a prefill and a decode step;
* :mod:`~vramplan.perf.comm` — communication (latency + bandwidth per collective, overlap);
* :mod:`~vramplan.perf.cost` — GPU-hours x prices;
* :mod:`~vramplan.perf.calibrate` — the fit of the calibrated coefficients (``python -m vramplan.perf``);
* :mod:`~vramplan.perf.custom` — GPUs the catalog lacks (``--gpu-spec``, ``--gpu custom:…``);
* :mod:`~vramplan.perf.report` — the ``time`` object of ``vramplan estimate --json``.
"""

from __future__ import annotations

from .calibrate import PINNED, calibration_samples, fit_throughput_model, refit
from .comm import allreduce_seconds, comm_time_s, exposed_comm_s, link_bandwidth_bytes_per_s, ring_allreduce_bytes
from .cost import Cost, cost_of
from .efficiency import (
    COEFFICIENTS,
    ENGINES,
    FEATURES,
    MEASURED_COPY_EFFICIENCY,
    MEASURED_GEMM_EFFICIENCY,
    EngineProfile,
    GPUEfficiency,
    ThroughputModel,
    engine_profile,
    feature_row,
    gpu_efficiency,
    load_throughput_model,
)
from .timing import (
    DecodeStep,
    InferenceTime,
    StepTime,
    TrainingTime,
    decode_seconds,
    decode_step,
    decode_traffic,
    engine_overhead_s,
    fp8_gemms,
    inference_time,
    step_time,
    training_time,
)
from .work import (
    StepWork,
    attended_keys,
    attention_kernel,
    compute_dtype,
    decode_work,
    dequantized_weights,
    inference_work,
    layer_matmul_weights,
    logits_bytes_per_element,
    training_work,
)

__all__ = [
    "COEFFICIENTS",
    "ENGINES",
    "FEATURES",
    "MEASURED_COPY_EFFICIENCY",
    "MEASURED_GEMM_EFFICIENCY",
    "PINNED",
    "Cost",
    "DecodeStep",
    "EngineProfile",
    "GPUEfficiency",
    "InferenceTime",
    "StepTime",
    "StepWork",
    "ThroughputModel",
    "TrainingTime",
    "allreduce_seconds",
    "attended_keys",
    "attention_kernel",
    "calibration_samples",
    "comm_time_s",
    "compute_dtype",
    "cost_of",
    "decode_seconds",
    "decode_step",
    "decode_traffic",
    "decode_work",
    "dequantized_weights",
    "engine_overhead_s",
    "engine_profile",
    "exposed_comm_s",
    "feature_row",
    "fit_throughput_model",
    "fp8_gemms",
    "gpu_efficiency",
    "inference_time",
    "inference_work",
    "layer_matmul_weights",
    "link_bandwidth_bytes_per_s",
    "load_throughput_model",
    "logits_bytes_per_element",
    "refit",
    "ring_allreduce_bytes",
    "step_time",
    "training_time",
    "training_work",
]
