"""Code-augmented MCTS: the search tree, generation backends, the batched generator and tree export."""

from .backends import Completion, GenerationBackend, TransformersBackend, mix_seed
from .export import tree_to_html, tree_to_outline
from .generator import MCTSConfig, MCTSGenerator, StepScorer, build_backend
from .server_backend import OpenAIServerBackend, ServerUnreachableError
from .tree import TREE_SCHEMA_VERSION, Node, SearchTree
from .vllm_backend import VLLMBackend  # vLLM itself is imported only when a VLLMBackend is built

__all__ = [
    "TREE_SCHEMA_VERSION",
    "Completion",
    "GenerationBackend",
    "MCTSConfig",
    "MCTSGenerator",
    "Node",
    "OpenAIServerBackend",
    "ServerUnreachableError",
    "SearchTree",
    "StepScorer",
    "TransformersBackend",
    "VLLMBackend",
    "build_backend",
    "mix_seed",
    "tree_to_html",
    "tree_to_outline",
]
