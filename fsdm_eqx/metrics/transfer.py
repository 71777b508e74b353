"""Does few-shot generation transfer to unseen classes? Figures in a model-independent space.

Images generated from a support set of a class the model never saw should be of that class and
not copies of the support. Both are measured here in a feature space that the model under test
did not shape (raw pixels, or Inception features), against real images of the same classes that
are not in any support set:

- `nearest_class_accuracy`: the fraction of generated images whose nearest class mean (over the
  held-out real images) is the class of their support set; chance is one over the classes.
- `support_distances`: each image's distance to the nearest image of its support set, for the
  generated images and for held-out real images alike: a model that copies its support gives
  generated distances far below the real ones.
"""

import numpy as np
from jaxtyping import Float, Integer


def _flat(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image (n, ...), got shape {x.shape}.")
    return x.reshape(x.shape[0], -1)


def nearest_class_accuracy(
    images: Float[np.ndarray, "n ..."],
    labels: Integer[np.ndarray, " n"],
    reference: Float[np.ndarray, "m ..."],
    reference_labels: Integer[np.ndarray, " m"],
) -> float:
    """The fraction of ``images`` whose nearest class mean of ``reference`` has their label.

    **Arguments:**
    - `images`, `labels`: the images to classify (e.g. generated from support sets of class
      `labels`), any shape per image.
    - `reference`, `reference_labels`: labelled real images of the candidate classes; every
      label of `labels` must occur among them.

    **Returns:** the accuracy in [0, 1], Euclidean distance to each class's mean image.
    """
    x, ref = _flat("images", images), _flat("reference", reference)
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"images have {x.shape[1]} features but reference {ref.shape[1]}.")
    classes = np.unique(reference_labels)
    missing = np.setdiff1d(np.unique(labels), classes)
    if missing.size:
        raise ValueError(f"labels {missing.tolist()} have no reference images.")
    means = np.stack([ref[reference_labels == c].mean(axis=0) for c in classes])
    distances = (x**2).sum(1)[:, None] - 2 * x @ means.T + (means**2).sum(1)[None]
    predicted = classes[np.argmin(distances, axis=1)]
    return float(np.mean(predicted == np.asarray(labels)))


def support_distances(
    images: Float[np.ndarray, "n ..."], supports: Float[np.ndarray, "n k ..."]
) -> Float[np.ndarray, " n"]:
    """The Euclidean distance from each image to the nearest image of its own support set.

    **Arguments:**
    - `images`: one image per row.
    - `supports`: for each image, the `k` images of its support set.

    **Returns:** the `n` distances, root of the summed squared pixel differences.
    """
    x = _flat("images", images)
    s = np.asarray(supports, np.float64)
    if s.shape[0] != x.shape[0] or s.ndim < 3:
        raise ValueError(
            f"supports must be (n, k, ...) with n={x.shape[0]} as images, got {s.shape}."
        )
    s = s.reshape(s.shape[0], s.shape[1], -1)
    return np.sqrt(np.min(((s - x[:, None]) ** 2).sum(-1), axis=1))
