"""chainrule's backpropagation engine: reverse-mode automatic differentiation on NumPy.

Usable on its own, like a small PyTorch:

    from worker.backprop import Tensor, nn, optim

It imports nothing but NumPy (no Ray, gRPC or protobuf), so it runs anywhere a model replica or
a parameter-server shard does.
"""
