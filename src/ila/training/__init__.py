"""Training on the HF Trainer: the response-only loss, the Trainer subclass that uses it, cost callbacks."""

from ila.training.cost import CostCallback, peak_memory_bytes
from ila.training.loss import response_loss
from ila.training.trainer import ResponseLossTrainer, training_arguments

__all__ = ["CostCallback", "ResponseLossTrainer", "peak_memory_bytes", "response_loss", "training_arguments"]
