"""Looking inside GPT-2: activation caches, weight processing, lenses, attribution,
patching and task datasets. Each module takes a model and calls it; none changes how
the model itself runs."""

from .attribution import Attribution, direct_logit_attribution
from .cache import ActivationCache, get_act_name
from .processing import process_weights

__all__ = ["ActivationCache", "get_act_name"]
__all__ += ["Attribution", "direct_logit_attribution", "process_weights"]
