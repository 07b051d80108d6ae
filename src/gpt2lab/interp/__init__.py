"""Looking inside GPT-2: activation caches, weight processing, lenses, attribution,
patching and task datasets. Each module takes a model and calls it; none changes how
the model itself runs."""

from .cache import ActivationCache, get_act_name

__all__ = ["ActivationCache", "get_act_name"]
