"""Seed example "Basic API": the echo step in a pool of two Ray actors.

    python examples/seed/actors_echo.py                     # actors, as declared
    PIPELINE_IR_BACKEND=local python examples/seed/actors_echo.py

With PIPELINE_IR_BACKEND=local or tasks the step runs there instead, with
one replica (replicas are actors). The code below is the seed page's, with
only the import line changed.
"""

import pipeline_ir as pipeline


@pipeline.step(execution_mode="actors", num_replicas=2)
def echo(inp):
    return inp


my_pipeline = echo(pipeline.INPUT).deploy()
assert my_pipeline.call(42) == 42
my_pipeline.shutdown()
print("actors_echo: ok")
