"""Steering vectors: make them from text, apply them in every path, save and share them.

    from gpt2lab.steering import mean_difference, steer
    v = mean_difference(model, ["I love it"], ["I hate it"], layers=2)
    with steer(model, v, 4.0):                      # generate, stream, score, run_with_cache
        model.generate("I think", max_new_tokens=20)
    model.generate("I think", steer=(v, 4.0))       # the same, for one call

vector.py (the vector and its file), make.py (ActAdd, mean difference, reading vectors),
apply.py (operators and absolute positions), gguf.py (llama.cpp control vectors),
sweep.py (layers x coefficients, with a random baseline and metrics).
"""

from .apply import Steering, steer
from .gguf import gguf_layer, load_gguf, save_gguf
from .make import actadd, mean_difference, reading_vector
from .vector import OPERATORS, SteeringVector, weights_fingerprint

__all__ = ["OPERATORS", "Steering", "SteeringVector", "actadd", "gguf_layer", "load_gguf"]
__all__ += ["mean_difference", "reading_vector", "save_gguf", "steer", "weights_fingerprint"]
