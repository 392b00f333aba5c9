"""The pipeline_ir demo (`make demo`): a small image-classification service.

    request {"id", "tier", "image": PNG bytes}
      -> preprocess (CPU, Ray tasks)
      -> switch on request["tier"]:
           "fast":     resnet18                          (Ray actors)
           "accurate": ensemble of resnet34 and resnet50 (Ray actors, fan-out)
      -> top_k -> respond (local postprocessing)

It prints the IR as traced, the IR after optimization, what each pass did,
and the generated code of the local run; then it serves the same requests on
every backend (local, the modes as declared, all tasks, all actors; the Ray
ones only when Ray is installed) and checks that the answers are identical.

    python examples/demo.py                 # every backend
    python examples/demo.py local actors    # only these

The models have random weights under a fixed seed (no download is possible
offline; pass weights_path= to load a local state_dict), and the images are
128x128 so that the whole demo runs in well under a minute on two cores.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import time

import numpy as np
import PIL.Image
import torch

import pipeline_ir as pipeline

IMAGE_SIZE = 128
TOP_K = 3


@pipeline.step(execution_mode="tasks", num_cpus=1)
def preprocess(image: bytes) -> torch.Tensor:
    """PNG bytes -> a normalized 1x3xHxW batch (CPU-bound: its own stage)."""
    from torchvision import transforms

    to_batch = transforms.Compose([
        transforms.Resize(IMAGE_SIZE),
        transforms.CenterCrop(IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Lambda(lambda t: t[:3, ...]),  # drop the alpha channel
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    tensor: torch.Tensor = to_batch(PIL.Image.open(io.BytesIO(image)))
    return tensor.unsqueeze(0)


@pipeline.step(execution_mode="actors")
class Classifier:
    """A torchvision ResNet; built once per replica, at deploy()."""

    def __init__(self, arch: str, weights_path: str | None = None) -> None:
        import torchvision.models

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random but reproducible weights
            self.model = getattr(torchvision.models, arch)(weights=None)
        if weights_path is not None:
            self.model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.model.eval()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = self.model(pixels)
        return logits


@pipeline.step
def mean_logits(*logits: torch.Tensor) -> torch.Tensor:
    """The ensemble: the models' logits averaged."""
    return torch.stack(logits).mean(dim=0)


@pipeline.step
def top_k(logits: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely classes, with probabilities rounded for the API."""
    probs, classes = torch.softmax(logits, dim=-1)[0].topk(k)
    return [(int(c), round(float(p), 4)) for c, p in zip(classes, probs)]


@pipeline.step
def respond(request_id: str, tier: str, top: list[tuple[int, float]]) -> dict[str, object]:
    """The response body."""
    return {"id": request_id, "tier": tier, "top": top}


def build() -> pipeline.PipelineNode:
    """The pipeline, as a user writes it: plain calls on nodes."""
    tier = pipeline.INPUT["tier"]  # one projection, read twice (fan-out)
    pixels = preprocess(pipeline.INPUT["image"])
    logits = pipeline.switch(
        tier,
        {
            "fast": Classifier("resnet18")(pixels),
            "accurate": mean_logits(Classifier("resnet34")(pixels), Classifier("resnet50")(pixels)),
        },
    )
    return respond(pipeline.INPUT["id"], tier, top_k(logits, k=TOP_K))


def make_requests() -> list[dict[str, object]]:
    """Four synthetic images (noise, gradients, an RGBA one), two per tier."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 160, dtype=np.uint8)
    images = [
        rng.integers(0, 256, (160, 160, 3), dtype=np.uint8),
        np.stack([np.tile(ramp, (160, 1))] * 3, axis=-1),
        rng.integers(0, 256, (160, 160, 4), dtype=np.uint8),  # RGBA
        np.stack([np.tile(ramp[:, None], (1, 160))] * 3, axis=-1),
    ]
    requests: list[dict[str, object]] = []
    for i, array in enumerate(images):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, "png")
        requests.append({"id": f"req-{i}", "tier": ("fast", "accurate")[i % 2], "image": buffer.getvalue()})
    return requests


def banner(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def serve(node: pipeline.PipelineNode, backend: str, requests: list[dict[str, object]]) -> list[object]:
    """Deploy on `backend` ("declared": each step's own mode), answer
    `requests`, shut down; print how long each phase took."""
    start = time.perf_counter()
    compiled = pipeline.compile(node, backend=None if backend == "declared" else backend)  # type: ignore[arg-type]
    with compiled.deploy() as p:
        deployed = time.perf_counter()
        answers = list(p.map(requests, max_in_flight=4))
        done = time.perf_counter()
        if backend == "local":
            banner("generated code of the local run (Pipeline.code)")
            print(p.code)
    print(f"{backend:>8}: deploy {deployed - start:5.2f} s, {len(requests)} requests {done - deployed:5.2f} s")
    return answers


def main(argv: list[str]) -> None:
    has_ray = importlib.util.find_spec("ray") is not None
    backends = argv or ["local", *(["declared", "tasks", "actors"] if has_ray else [])]
    node = build()
    compiled = pipeline.compile(node)

    banner("IR as traced (compiled.source_graph.dump())")
    print(compiled.source_graph.dump())
    banner("IR after optimization (compiled.graph.dump())")
    print(compiled.graph.dump())
    banner("what the passes did (compiled.explain())")
    print(compiled.explain())

    requests = make_requests()
    banner("serving " + ", ".join(backends))
    answers = {backend: serve(node, backend, requests) for backend in backends}

    banner("answers")
    for answer in answers[backends[0]]:
        print(answer)
    different = [b for b in backends if answers[b] != answers[backends[0]]]
    assert not different, f"answers differ between {backends[0]} and {different}"
    print(f"identical on: {', '.join(backends)}" + ("" if has_ray else " (Ray is not installed: no Ray backend ran)"))

    banner("an unknown tier: the switch has no default")
    with pipeline.compile(node, backend="local").deploy() as p:
        try:
            p.call({**requests[0], "tier": "premium"})
        except pipeline.StepError as e:
            print(f"StepError: {e}\n  cause: {e.__cause__!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
