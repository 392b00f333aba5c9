"""Seed example "Basic API": a chain of two steps.

    python examples/seed/chain.py
    PIPELINE_IR_BACKEND=tasks python examples/seed/chain.py

The code below is the seed page's, with only the import line changed
(`double` squares its input: that is the seed's code, kept as it is).
"""

import pipeline_ir as pipeline


@pipeline.step
def add_one(inp):
    return inp + 1


@pipeline.step
def double(inp):
    return inp**2


my_node = double(add_one(pipeline.INPUT))
my_pipeline = my_node.deploy()
assert my_pipeline.call(1) == 4
my_pipeline.shutdown()
print("chain: ok")
