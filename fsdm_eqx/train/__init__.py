"""Training: the state PyTree, the optimiser, the pure step, data parallelism, checkpoints, loop."""

from .checkpoint import (
    BEST_DIR as BEST_DIR,
    CheckpointError as CheckpointError,
    DamagedCheckpointError as DamagedCheckpointError,
    latest_checkpoint as latest_checkpoint,
    read_checkpoint_metadata as read_checkpoint_metadata,
    restore_checkpoint as restore_checkpoint,
    resumable_checkpoint as resumable_checkpoint,
    save_checkpoint as save_checkpoint,
    verify_checkpoint as verify_checkpoint,
)
from .loop import NonFiniteError as NonFiniteError, train as train
from .objective import fsdm_loss_fn as fsdm_loss_fn
from .optimizer import (
    ScheduleState as ScheduleState,
    applied_learning_rate as applied_learning_rate,
    current_learning_rate as current_learning_rate,
    ema_decay_at as ema_decay_at,
    ema_update as ema_update,
    learning_rate_at as learning_rate_at,
    learning_rate_schedule as learning_rate_schedule,
    make_optimizer as make_optimizer,
    plateau_scale as plateau_scale,
    trainable_filter as trainable_filter,
)
from .parallel import (
    DATA_AXIS as DATA_AXIS,
    initialize_distributed as initialize_distributed,
    make_mesh as make_mesh,
    replicate as replicate,
    shard_batch as shard_batch,
)
from .state import TrainState as TrainState, init_train_state as init_train_state
from .step import (
    LossFn as LossFn,
    cast_floating as cast_floating,
    grad_param_ratios as grad_param_ratios,
    make_train_step as make_train_step,
    make_update_probe as make_update_probe,
)
