"""Instrumentation as pure functions of the training state; nothing here changes training."""

from .norms import (
    context_statistics as context_statistics,
    global_norm as global_norm,
    subtree_norms as subtree_norms,
)
from .sinks import (
    ConsoleSink as ConsoleSink,
    JsonlSink as JsonlSink,
    MultiSink as MultiSink,
    NullSink as NullSink,
    Sink as Sink,
)
from .wandb_sink import WandbSink as WandbSink, make_sink as make_sink
