"""Asynchronous and synchronous SGD on a parameter server (MSRA's distributed deep learning, seed 003).

rules.py (SSGD, ASGD, DC-ASGD's delay compensation), server.py (the weights, the optimizer and the order of
updates), worker.py (pull, compute, push), group.py (the RPC group), run.py (any nn.Module with a step function),
local.py (processes on this machine without torchrun), worker_process.py (a worker under torchrun whose death does
not stop the job).
"""
