"""Two-sample distances between real and generated cells in a shared embedding (PCA of the real cells).

Every function takes `real [N, D]` and `generated [M, D]` float arrays and computes on all rows it is given:
pairwise costs are O((N + M)^2) memory and the optimal-transport solve is roughly cubic, so subsample first
(`evaluate_generation` caps each condition at `max_cells_per_condition`).
"""

import numpy as np
import ot
from scipy.spatial.distance import cdist, pdist
from sklearn.neighbors import NearestNeighbors

# RBF bandwidths of the MMD kernel, as multiples of the median pairwise distance between *real* cells, so that the
# kernel does not depend on the model being judged.
MMD_BANDWIDTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd_rbf(real: np.ndarray, generated: np.ndarray, bandwidth_scales=MMD_BANDWIDTH_SCALES) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels `exp(-d^2 / (2 sigma^2))`, `sigma = scale * median real distance`."""
    sigmas = np.asarray(bandwidth_scales) * np.median(pdist(real))

    def kernel(a, b):
        squared = cdist(a, b, "sqeuclidean")
        return sum(np.exp(-squared / (2 * sigma**2)) for sigma in sigmas)

    def mean_off_diagonal(gram):
        n = gram.shape[0]
        return (gram.sum() - np.trace(gram)) / (n * (n - 1))

    cross = kernel(real, generated).mean()
    return float(mean_off_diagonal(kernel(real, real)) + mean_off_diagonal(kernel(generated, generated)) - 2 * cross)


def wasserstein(real: np.ndarray, generated: np.ndarray, p: int = 2) -> float:
    """Exact W_p (p = 1 or 2) between the uniform empirical measures, with POT's network simplex (`ot.emd2`)."""
    metric = {1: "euclidean", 2: "sqeuclidean"}[p]
    cost = ot.dist(real, generated, metric=metric)
    return float(ot.emd2([], [], cost, numItermax=10_000_000) ** (1 / p))


def energy_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """Energy distance `2 E|X-Y| - E|X-X'| - E|Y-Y'|`; within-sample terms exclude i = j (~0 for equal laws)."""
    return float(2 * cdist(real, generated).mean() - pdist(real).mean() - pdist(generated).mean())


def nearest_neighbor_accuracy(real: np.ndarray, generated: np.ndarray, seed: int = 0) -> float:
    """Leave-one-out 1-NN two-sample accuracy on equally many real and generated cells: 0.5 ideal, 1.0 separable."""
    rng = np.random.default_rng(seed)
    n = min(len(real), len(generated))
    pooled = np.concatenate([rng.permutation(real)[:n], rng.permutation(generated)[:n]])
    is_generated = np.repeat([False, True], n)
    # Querying with X=None excludes each point from its own neighbours (leave-one-out).
    neighbor = NearestNeighbors(n_neighbors=1).fit(pooled).kneighbors(return_distance=False)[:, 0]
    return float((is_generated[neighbor] == is_generated).mean())


def precision_recall_density_coverage(real: np.ndarray, generated: np.ndarray, k: int = 5) -> dict[str, float]:
    """Naeem et al. (2020) manifold metrics from k-NN balls (radius = distance to the k-th neighbour); ideal 1."""

    def knn_radii(points):
        distances, _ = NearestNeighbors(n_neighbors=k).fit(points).kneighbors()
        return distances[:, -1]

    real_radii, generated_radii = knn_radii(real), knn_radii(generated)
    distances = cdist(real, generated)  # [N, M]
    inside_real_balls = distances < real_radii[:, None]
    return {
        "precision": float(inside_real_balls.any(axis=0).mean()),
        "recall": float((distances < generated_radii[None, :]).any(axis=1).mean()),
        "density": float(inside_real_balls.sum(axis=0).mean() / k),
        "coverage": float((distances.min(axis=1) < real_radii).mean()),
    }


def distribution_metrics(real: np.ndarray, generated: np.ndarray, seed: int = 0) -> dict[str, float]:
    """All two-sample metrics above for one pair of embeddings `[N, D]`, `[M, D]`."""
    return {
        "mmd_rbf": mmd_rbf(real, generated),
        "wasserstein_1": wasserstein(real, generated, p=1),
        "wasserstein_2": wasserstein(real, generated, p=2),
        "energy_distance": energy_distance(real, generated),
        "nn_accuracy": nearest_neighbor_accuracy(real, generated, seed=seed),
        **precision_recall_density_coverage(real, generated),
    }
