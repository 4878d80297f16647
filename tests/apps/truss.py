"""A Truss-style model for Baseten's async inference (tests/e2e/test_baseten_async.py):
``predict`` takes the request's ``model_input`` whole, as a Truss model's does."""


def predict(model_input):
    if model_input == "fail":
        raise ValueError("asked to fail")
    return {"echo": model_input}
