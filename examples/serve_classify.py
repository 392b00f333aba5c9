"""Image classification over HTTP: the seed's chaining pipeline
(preprocess in Ray tasks -> resnet18 in two Ray actors) behind Ray Serve.

    python examples/serve_classify.py                    # serves until Ctrl-C (or SIGTERM)
    python examples/serve_classify.py --port 8001 --weights resnet18.pt
    python examples/serve_classify.py --check            # one request to itself, then exit

Then, from another shell (any PNG will do; this writes a test one):

    python -c "import PIL.Image; PIL.Image.new('RGB', (224, 224), 'red').save('image.png')"
    curl --data-binary @image.png -H 'Content-Type: image/png' http://127.0.0.1:8000/classify
    {"top_5_categories":[...],"top_5_scores":[...]}

The PNG's bytes are the pipeline's input (any Content-Type but
application/json passes the raw body); the answer is the model's top 5 as
JSON. The steps are examples/seed/classification.py's, imported from there:
random weights under a fixed seed unless `--weights` names a local
state_dict for resnet18 (nothing can be downloaded here), so the categories
are not meaningful ImageNet ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "seed"))

import pipeline_ir as pipeline  # noqa: E402
from classification import ClassificationModel, assert_same_prediction, dummy_png_bytes, preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--weights", help="a local resnet18 state_dict (default: random weights, fixed seed)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take (504 past it)")
    parser.add_argument("--check", action="store_true", help="classify a test image over HTTP, compare, and exit")
    args = parser.parse_args(argv)

    from ray import serve

    from pipeline_ir.serve import app

    node = ClassificationModel("resnet18", weights_path=args.weights)(preprocess(pipeline.INPUT))
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(app(node, name="classify", timeout=args.timeout, max_in_flight=32), name="classify", route_prefix="/classify")
    url = f"http://127.0.0.1:{args.port}/classify"
    print(f"serving the resnet18 classifier at {url}", flush=True)
    try:
        if args.check:
            check(url, args.weights)
        else:
            print("POST a PNG to it (see this file's docstring); Ctrl-C stops", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # ends the ingress replica, whose pipeline ends its actors
    return 0


def check(url: str, weights: str | None) -> None:
    """POST the seed's dummy PNG and compare with calling the steps directly."""
    request = urllib.request.Request(url, data=dummy_png_bytes, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=120) as response:
        got = json.loads(response.read())
    expected = ClassificationModel.__wrapped__("resnet18", weights)(preprocess.__wrapped__(dummy_png_bytes))
    assert_same_prediction(got, expected)
    print("serve_classify: ok", got["top_5_categories"])


if __name__ == "__main__":
    sys.exit(main())
