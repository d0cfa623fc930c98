"""The task kinds live in nora.tasks (one module per kind, one registry); kept here for older imports."""

from ..tasks import TASKS, Batch, Example, Loss, TaskKind
from ..tasks.causal_lm import CausalLM as CausalLMTask
from ..tasks.dreambooth import DreamBooth as DreamBoothTask
from ..tasks.image_cls import ImageClassification as ImageClassificationTask
from ..tasks.regression import Regression as RegressionTask
from ..tasks.seq_cls import SequenceClassification as SequenceClassificationTask

Task = TaskKind

__all__ = ["TASKS", "Batch", "CausalLMTask", "DreamBoothTask", "Example", "ImageClassificationTask", "Loss",
           "RegressionTask", "SequenceClassificationTask", "Task"]  # fmt: skip
