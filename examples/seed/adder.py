"""Seed example "Basic API": a class step, instantiated with init args and
then called on its upstream node. The constructor runs at deploy(), once per
replica, never while the pipeline is built.

    python examples/seed/adder.py
    PIPELINE_IR_BACKEND=actors python examples/seed/adder.py

The code below is the seed page's, with only the import line changed.
"""

import pipeline_ir as pipeline


@pipeline.step
class Adder:
    def __init__(self, value):
        self.value = value

    def __call__(self, inp):
        return self.value + inp


my_pipeline = Adder(2)(pipeline.INPUT).deploy()
assert my_pipeline.call(2) == 4
my_pipeline.shutdown()
print("adder: ok")
