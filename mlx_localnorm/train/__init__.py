"""Training: the shared step loop, pre-training, fine-tuning, checkpoints and exact resume."""

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from .config import PretrainConfig
from .finetune import FinetuneConfig, Finetuner
from .loop import TrainLoop
from .metrics import plot_metrics, read_metrics
from .pretrain import Pretrainer, resume_config
from .schedule import lr_schedule

__all__ = [
    "CheckpointError",
    "FinetuneConfig",
    "Finetuner",
    "PretrainConfig",
    "Pretrainer",
    "TrainLoop",
    "list_checkpoints",
    "load_checkpoint",
    "lr_schedule",
    "plot_metrics",
    "read_metrics",
    "resume_config",
    "save_checkpoint",
]
