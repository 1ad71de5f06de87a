"""The process preference model: training data from search trees, `PPMTrainer`, and scorers the search uses
(transformers, vLLM offline, or a `vllm serve` PPM server)."""

from .data import build_outcome_pairs, build_preference_pairs, build_sft_dataset, build_step_values
from .quality import (
    first_error_prediction,
    make_tiny_processbench,
    oracle_threshold,
    pair_accuracy,
    processbench_metrics,
    processbench_report,
    score_processbench,
    threshold_sweep,
    validate_pairs,
    validate_processbench,
)
from .reward import CompletionJudge, CorrectnessReward, JudgedCompletion, PPMReward
from .scorer import (
    LEGACY_VALUE_TRANSFORM,
    VALUE_TRANSFORM_KEY,
    PPMScorer,
    TransformersPPMScorer,
    ValueTransform,
    VLLMPPMScorer,
    load_ppm_scorer,
    ppm_text,
    read_value_transform,
    value_from_score,
    write_value_transform,
)
from .server_scorer import ServerPPMScorer
from .trainer import DEFAULT_VALUE_TRANSFORM, DataCollatorForPPM, PPMConfig, PPMTrainer

__all__ = [
    "CompletionJudge",
    "CorrectnessReward",
    "JudgedCompletion",
    "PPMReward",
    "DEFAULT_VALUE_TRANSFORM",
    "LEGACY_VALUE_TRANSFORM",
    "VALUE_TRANSFORM_KEY",
    "DataCollatorForPPM",
    "PPMConfig",
    "PPMScorer",
    "PPMTrainer",
    "ServerPPMScorer",
    "TransformersPPMScorer",
    "VLLMPPMScorer",
    "ValueTransform",
    "build_outcome_pairs",
    "build_preference_pairs",
    "build_sft_dataset",
    "build_step_values",
    "load_ppm_scorer",
    "first_error_prediction",
    "make_tiny_processbench",
    "oracle_threshold",
    "pair_accuracy",
    "ppm_text",
    "processbench_metrics",
    "processbench_report",
    "read_value_transform",
    "score_processbench",
    "threshold_sweep",
    "validate_pairs",
    "validate_processbench",
    "value_from_score",
    "write_value_transform",
]
