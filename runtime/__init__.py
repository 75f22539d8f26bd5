"""What runs memcompile's rewritten graphs: Inductor's code, or FX graphs run in Python.

`runtime` never imports `memcompile.passes`: it runs graphs, it does not decide about them.
"""
