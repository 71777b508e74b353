"""Instrumentation as pure functions of the training state; nothing here changes training."""

from .encoder import (
    Visuals as Visuals,
    activation_stats as activation_stats,
    attention_maps as attention_maps,
    attention_rollout as attention_rollout,
    collect_visuals as collect_visuals,
    context_saliency as context_saliency,
    parameter_histograms as parameter_histograms,
    position_similarity as position_similarity,
    position_similarity_image as position_similarity_image,
    rollout_matrix as rollout_matrix,
)
from .figures import (
    fid_eval_figure as fid_eval_figure,
    generation_figure as generation_figure,
    heatmap as heatmap,
    image_grid as image_grid,
    maps_figure as maps_figure,
    support_target_figure as support_target_figure,
)
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
