"""Datasets, class-disjoint few-shot splits and the set sampler; numpy only, no JAX."""

from .cifar100 import (
    FC100_SUPERCLASSES as FC100_SUPERCLASSES,
    SUPERCLASSES as SUPERCLASSES,
    fc100_classes as fc100_classes,
    load_cifar100 as load_cifar100,
    superclass_of as superclass_of,
)
from .dataset import LabelledImages as LabelledImages
from .download import DataError as DataError, default_cache_dir as default_cache_dir
from .mnist import load_mnist as load_mnist
from .omniglot import (
    OneShotRun as OneShotRun,
    load_omniglot as load_omniglot,
    load_omniglot_runs as load_omniglot_runs,
)
from .pipeline import load_dataset as load_dataset, make_sampler as make_sampler
from .sets import (
    BatchStream as BatchStream,
    EvaluationClass as EvaluationClass,
    SetSampler as SetSampler,
    evaluation_sets as evaluation_sets,
)
from .splits import ClassSplit as ClassSplit, class_split as class_split
