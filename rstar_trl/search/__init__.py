"""Code-augmented MCTS: the search tree, generation backends, the batched generator and tree export."""

from .backends import Completion, GenerationBackend, TransformersBackend
from .export import tree_to_html, tree_to_outline
from .generator import MCTSConfig, MCTSGenerator, StepScorer
from .tree import TREE_SCHEMA_VERSION, Node, SearchTree

__all__ = [
    "TREE_SCHEMA_VERSION",
    "Completion",
    "GenerationBackend",
    "MCTSConfig",
    "MCTSGenerator",
    "Node",
    "SearchTree",
    "StepScorer",
    "TransformersBackend",
    "tree_to_html",
    "tree_to_outline",
]
