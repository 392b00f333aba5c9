"""Seed example "Basic API": one step that returns its input.

    python examples/seed/echo.py                          # as declared (LOCAL)
    PIPELINE_IR_BACKEND=actors python examples/seed/echo.py

The code below is the seed page's, with only the import line changed.
"""

import pipeline_ir as pipeline


@pipeline.step
def echo(inp):
    return inp


my_node = echo(pipeline.INPUT)
my_pipeline = my_node.deploy()
assert my_pipeline.call(42) == 42
my_pipeline.shutdown()
print("echo: ok")
