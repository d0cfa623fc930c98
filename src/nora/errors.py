"""The one exception type nora raises for bad input: its message names the problem and the fix."""


class AdapterError(ValueError):
    pass
