"""A tiny library the example apps depend on, shipped as a wheel so builds need no internet."""


def greet(name: str) -> str:
    return f"Hello, {name}!"
