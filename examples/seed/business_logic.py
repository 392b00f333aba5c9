"""Seed example "Combining business logic + ML models": an ensemble whose
combine step runs arbitrary Python (a database read, a weighting, a response
model) between and after the models.

    python examples/seed/business_logic.py                  # as declared
    PIPELINE_IR_BACKEND=tasks python examples/seed/business_logic.py

The seed gives `dynamic_weighting_combine` as pseudo-code over names it never
defines. Its body is kept as it is; what it calls (`my_db`, `average`,
`my_response_model`) are small local stand-ins, and so are the models: two
numpy linear classifiers with fixed random weights, so that this example
needs neither pretrained weights nor torch. The result is checked against
calling the same steps directly, in plain Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

import pipeline_ir as pipeline

NUM_FEATURES = 16
NUM_CLASSES = 5


class InMemoryDB:
    """Stand-in for a database client: `get(key)` returns a stored value."""

    def __init__(self, data: Mapping[str, object]) -> None:
        self._data = dict(data)

    def get(self, key: str) -> object:
        return self._data[key]


class ResponseModel:
    """Stand-in for the API's response schema: turns per-example score rows
    into the JSON body a client receives."""

    def reshape(self, rows: Sequence[np.ndarray]) -> dict[str, list[list[int]]]:
        return {"scores": [row.tolist() for row in rows]}


my_db = InMemoryDB({"dynamic_weights": [0.75, 0.25]})
my_response_model = ResponseModel()


def average(outputs: Sequence[np.ndarray], weights: object) -> np.ndarray:
    """The models' score arrays averaged with `weights`, one per model."""
    return np.average(np.stack(outputs), axis=0, weights=np.asarray(weights))


@pipeline.step
def featurize(rows: list[list[float]]) -> np.ndarray:
    """Stand-in preprocessing: a batch of raw rows to standardized features."""
    x = np.asarray(rows, dtype=np.float64)
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-9)


@pipeline.step(execution_mode="actors", num_replicas=2)
class StandInModel:
    """Stand-in classifier: a linear model with fixed random weights that
    scores each example from 0 to 100 per class."""

    def __init__(self, seed: int) -> None:
        self.weights = np.random.default_rng(seed).normal(size=(NUM_FEATURES, NUM_CLASSES))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.weights
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return 100 * e / e.sum(axis=1, keepdims=True)


@pipeline.step
def dynamic_weighting_combine(*classifier_outputs):
    # Pseudo-code:
    # Example of bringing in custom business logic and arbitrary Python code.
    # You can issue database queries, log metrics, and run complex computation.
    my_weights = my_db.get("dynamic_weights")
    weighted_output = average(classifier_outputs, my_weights)
    my_api_response = my_response_model.reshape(
        [out.astype("int") for out in weighted_output])
    return my_api_response


features_node = featurize(pipeline.INPUT)
model_nodes = [StandInModel(seed)(features_node) for seed in [1, 2]]
business_pipeline = dynamic_weighting_combine(*model_nodes).deploy()

batch = np.random.default_rng(0).normal(size=(3, NUM_FEATURES)).tolist()
result = business_pipeline.call(batch)
business_pipeline.shutdown()

# The same steps called directly (`__wrapped__` is the undecorated code).
features = featurize.__wrapped__(batch)
expected = dynamic_weighting_combine.__wrapped__(
    *[StandInModel.__wrapped__(seed)(features) for seed in [1, 2]]
)
assert result == expected, (result, expected)
print("business_logic: ok", result)
