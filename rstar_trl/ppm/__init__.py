"""The process preference model: training data from search trees, `PPMTrainer`, and scorers the search uses."""

from .data import build_outcome_pairs, build_preference_pairs, build_sft_dataset, build_step_values
from .scorer import PPMScorer, TransformersPPMScorer, VLLMPPMScorer, ppm_text
from .trainer import DataCollatorForPPM, PPMConfig, PPMTrainer

__all__ = [
    "DataCollatorForPPM",
    "PPMConfig",
    "PPMScorer",
    "PPMTrainer",
    "TransformersPPMScorer",
    "VLLMPPMScorer",
    "build_outcome_pairs",
    "build_preference_pairs",
    "build_sft_dataset",
    "build_step_values",
    "ppm_text",
]
