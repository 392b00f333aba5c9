"""Seed example "Ensemble": preprocess -> [resnet18, resnet34] ->
combine_output, a scatter-gather pipeline.

    python examples/seed/ensemble.py                        # as declared
    PIPELINE_IR_BACKEND=local python examples/seed/ensemble.py

Builds on classification.py, as the seed's section builds on the chaining
one: the steps and the dummy image come from there, with the same three
changes (random weights under a fixed seed, a 224x224 image, and a check
against calling the steps directly instead of hard-coded ImageNet
categories, which only pretrained weights would give).
"""

from __future__ import annotations

import pipeline_ir as pipeline
from classification import ClassificationModel, dummy_png_bytes, preprocess


@pipeline.step
def combine_output(*classifier_outputs):
    # Here will we will just concatenate the result from multiple models
    # You can easily extend this to other ensemble techniques like voting
    # or weighted average.
    return sum([out["top_5_categories"] for out in classifier_outputs], [])


preprocess_node = preprocess(pipeline.INPUT)
model_nodes = [
    ClassificationModel(model)(preprocess_node)
    for model in ["resnet18", "resnet34"]
]
ensemble_pipeline = combine_output(*model_nodes).deploy()
result = ensemble_pipeline.call(dummy_png_bytes)
ensemble_pipeline.shutdown()

# The same steps called directly, in plain Python (`__wrapped__` is the
# undecorated function or class).
pixels = preprocess.__wrapped__(dummy_png_bytes)
expected = combine_output.__wrapped__(
    *[ClassificationModel.__wrapped__(model)(pixels) for model in ["resnet18", "resnet34"]]
)
assert result == expected, (result, expected)
print("ensemble: ok", result)
