"""Evaluation: the commonsense suite (log-likelihood and generation protocols) and GLUE-style classification.

from nora.evaluation import evaluate_tasks
results = evaluate_tasks(model, tokenizer, ["commonsense"], ["loglik", "generate"], data_dir="data", limit=200)
"""

from .classification import classification_metrics, predict_labels, predict_logits, regression_metrics
from .fewshot import PromptStyle
from .generation import generate_responses
from .loglik import LoglikRequest, continuation_logliks
from .records import ANSWER_PREFIX, CommonsenseItem, extract_answer, parse_item
from .runner import PROTOCOLS, PreparedTask, best, best_per_char, evaluate_tasks, prepare_tasks, score_commonsense
from .tasks import (
    COMMONSENSE_TASKS,
    GLUE_TASKS,
    Columns,
    Head,
    TaskSpec,
    load_classification,
    load_commonsense,
    resolve_tasks,
)

__all__ = [
    "ANSWER_PREFIX",
    "COMMONSENSE_TASKS",
    "GLUE_TASKS",
    "PROTOCOLS",
    "Columns",
    "CommonsenseItem",
    "Head",
    "PreparedTask",
    "PromptStyle",
    "LoglikRequest",
    "TaskSpec",
    "best",
    "best_per_char",
    "classification_metrics",
    "continuation_logliks",
    "evaluate_tasks",
    "extract_answer",
    "generate_responses",
    "load_classification",
    "load_commonsense",
    "parse_item",
    "predict_labels",
    "prepare_tasks",
    "predict_logits",
    "regression_metrics",
    "resolve_tasks",
    "score_commonsense",
]
