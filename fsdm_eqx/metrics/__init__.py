"""Evaluation: the FID InceptionV3, feature statistics, FID / KID and the few-shot protocols."""

from ._inception_weights import InceptionWeightsError as InceptionWeightsError
from .fewshot import (
    FewShotFIDResult as FewShotFIDResult,
    draw_support_sets as draw_support_sets,
    fewshot_fid as fewshot_fid,
    generate_for_sets as generate_for_sets,
    to_uint8 as to_uint8,
)
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
from .likelihood import (
    LikelihoodResult as LikelihoodResult,
    bits_per_dim as bits_per_dim,
    fewshot_likelihood as fewshot_likelihood,
    set_bits_per_dim as set_bits_per_dim,
    vlb_bpd_terms as vlb_bpd_terms,
)
from .probe import (
    ProbeResult as ProbeResult,
    fewshot_probe as fewshot_probe,
    nearest_context_classify as nearest_context_classify,
)
