"""Pipelines for the CLI tests (`pipeline-ir dump cli_target:...`)."""

import pipeline_ir as pipeline


@pipeline.step
def add_one(x: int) -> int:
    return x + 1


@pipeline.step
def double(x: int) -> int:
    return x * 2


chain = double(add_one(pipeline.INPUT))
compiled = pipeline.compile(chain, name="chain")
both = (add_one(pipeline.INPUT), double(pipeline.INPUT))
not_a_pipeline = 42
