"""Seed example "Chaining": CPU-bound preprocessing in Ray tasks, then an
image classifier in a pool of two Ray actors (preprocess -> resnet18).

    python examples/seed/classification.py                  # as declared
    PIPELINE_IR_BACKEND=local python examples/seed/classification.py

The pipeline code is the seed page's with the import line changed, the lines
the page lost rebuilt, and three changes this machine forces, each marked
where it is made:

- No pretrained weights can be downloaded here, so the models are built with
  `weights=None` under a fixed seed (pass `weights_path=` to load a local
  state_dict instead).
- Hence the seed's assertion of ImageNet categories cannot hold: the script
  checks instead that the pipeline gives what calling the very same step
  function and class directly, in plain Python, gives.
- The dummy image is 224x224 (the size these ResNets were trained at)
  instead of 720x720, so that the example stays fast on a CPU.

ensemble.py imports `preprocess`, `ClassificationModel` and
`dummy_png_bytes` from here, as the seed's ensemble section builds on this
one; the pipeline itself runs only when this file is the script.
"""

from __future__ import annotations

import math

import pipeline_ir as pipeline


@pipeline.step(execution_mode="tasks")
def preprocess(img_bytes):
    from torchvision import transforms
    import PIL.Image
    import io

    preprocessor = transforms.Compose([
        transforms.ToTensor(),
        transforms.Lambda(lambda t: t[:3, ...]),  # remove alpha channel
        transforms.Normalize(
            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    return preprocessor(PIL.Image.open(io.BytesIO(img_bytes))).unsqueeze(0)


@pipeline.step(execution_mode="actors", num_replicas=2)
class ClassificationModel:
    def __init__(self, model_name, weights_path=None):
        import torch
        import torchvision.models.resnet

        # Offline: random weights, the same in every replica and process.
        # fork_rng keeps the seed from changing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = getattr(torchvision.models.resnet, model_name)(weights=None)
        if weights_path is not None:
            self.model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        # Inference mode for batch norm and dropout: without it every call
        # would update the running statistics, and results would drift.
        self.model.eval()

    def __call__(self, inp_tensor):
        import torch
        with torch.no_grad():
            output = self.model(inp_tensor).squeeze()
            sorted_value, sorted_idx = output.sort()
        return {
            "top_5_categories": sorted_idx.numpy().tolist()[-5:],
            "top_5_scores": sorted_value.numpy().tolist()[-5:]
        }


import PIL.Image
import io
import numpy as np

# Generate dummy input (224x224, see the module docstring; uint8 and no
# `mode=`, which current Pillow requires for an RGB array).
_buffer = io.BytesIO()
PIL.Image.fromarray(
    np.zeros((224, 224, 3), np.uint8)).save(_buffer, "png")
dummy_png_bytes = _buffer.getvalue()


def assert_same_prediction(got: dict[str, list[float]], want: dict[str, list[float]]) -> None:
    """The categories must be equal; the scores equal up to float rounding,
    since another process may sum in another order (other thread counts)."""
    assert got["top_5_categories"] == want["top_5_categories"], (got, want)
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got["top_5_scores"], want["top_5_scores"], strict=True)), (got, want)


if __name__ == "__main__":
    sequential_pipeline = (ClassificationModel("resnet18")(preprocess(
        pipeline.INPUT)).deploy())
    result = sequential_pipeline.call(dummy_png_bytes)
    sequential_pipeline.shutdown()

    # The same step function and class, called directly: a decorated step
    # keeps the original as `__wrapped__`, as functools.wraps does.
    expected = ClassificationModel.__wrapped__("resnet18")(preprocess.__wrapped__(dummy_png_bytes))
    assert_same_prediction(result, expected)
    print("classification: ok", result["top_5_categories"])
