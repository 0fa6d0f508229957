"""The model owner and everything a request goes through on its way to `generate`.

Import the submodules (`function.engine.engine`, `function.engine.types`, …): this package's
`__init__` stays empty so that `function.engine.types` can be imported by the weights layer
without pulling in the engine.
"""
