"""From a `DataConfig` to a dataset, its class split and the set sampler."""

from ..config import DataConfig
from .cifar100 import load_cifar100
from .dataset import LabelledImages
from .mnist import load_mnist
from .omniglot import load_omniglot
from .sets import SetSampler
from .splits import ClassSplit, class_split


def load_dataset(config: DataConfig) -> tuple[LabelledImages, ClassSplit]:
    """Load the configured dataset and split its classes.

    **Arguments:**

    - `config`: the data configuration.

    **Returns:**

    The dataset and its `ClassSplit` (write ``split.to_dict()`` into the run's config).
    """
    if config.dataset == "cifar100":
        data = load_cifar100(config.data_dir, cache_dir=config.cache_dir, download=config.download)
    elif config.dataset == "omniglot":
        data = load_omniglot(
            config.omniglot_subsets,
            image_size=config.image_size,
            data_dir=config.data_dir,
            cache_dir=config.cache_dir,
            download=config.download,
        )
    else:
        data = load_mnist(
            data_dir=config.data_dir, cache_dir=config.cache_dir, download=config.download
        )
    split = class_split(
        config.class_split, data.labels, class_names=data.class_names, seed=config.split_seed
    )
    return data, split


def make_sampler(
    config: DataConfig,
    data: LabelledImages,
    split: ClassSplit,
    *,
    host_index: int = 0,
    host_count: int = 1,
) -> SetSampler:
    """The set sampler of `config.split`, this host's share of `config.batch_size` sets.

    **Arguments:**

    - `config`: the data configuration; its `batch_size` counts sets over all hosts.
    - `data`, `split`: from `load_dataset`.
    - `host_index`, `host_count`: this host's place in a multi-host run.

    **Returns:**

    A `SetSampler`; flips apply only to the training split.
    """
    if config.batch_size % host_count:
        raise ValueError(
            f"DataConfig.batch_size={config.batch_size} does not divide among {host_count} hosts; "
            "choose a multiple of the host count."
        )
    return SetSampler(
        data.images,
        data.labels,
        split.classes(config.split),
        ns=config.ns,
        batch_size=config.batch_size // host_count,
        seed=config.seed,
        flips=config.flips and config.split == "train",
        host_index=host_index,
        host_count=host_count,
        prefetch=config.prefetch,
        workers=config.workers,
    )
