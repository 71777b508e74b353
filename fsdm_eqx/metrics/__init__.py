"""Evaluation: the FID InceptionV3, feature statistics, FID / KID and the few-shot protocols."""

from ._inception_weights import InceptionWeightsError as InceptionWeightsError
from .fid import (
    FeatureStatistics as FeatureStatistics,
    KIDResult as KIDResult,
    PrecisionRecall as PrecisionRecall,
    feature_statistics as feature_statistics,
    frechet_distance as frechet_distance,
    frechet_distance_eig as frechet_distance_eig,
    kid as kid,
    precision_recall as precision_recall,
)
from .inception import (
    InceptionV3 as InceptionV3,
    inception_features as inception_features,
    load_inception as load_inception,
)
