"""Looking inside GPT-2: activation caches, weight processing, factored matrices (OV / QK
circuits), lenses, attribution, patching and task datasets; neurons over a corpus
(neurons, neuron_card, correlate, over corpus's token windows) and weights read in
vocabulary space (vocab_space, edits). Each module takes a model and calls it; none
changes how the model itself runs, except edits, which writes weights and undoes it.
Steering lives in gpt2lab.steering."""

from .attribution import Attribution, direct_logit_attribution
from .cache import ActivationCache, get_act_name
from .correlate import Correlations, correlate, load_correlations
from .edits import AnswerContributions, ValueEdit, edit_value_vector, mlp_answer_contributions
from .factored_matrix import FactoredMatrix
from .ioi import IOIDataset, ioi_dataset, ioi_score, mean_ablation_hooks
from .lens import LensResult, lens_kl, logit_lens
from .neurons import NeuronStats, load_stats, neuron_stats
from .patching import PatchResult, activation_patch, logit_diff, normalized_logit_diff
from .path_patching import path_patch, path_patch_heads
from .processing import process_weights
from .tuned_lens import TunedLens, train_tuned_lens
from .vocab_space import (
    NeuronVocabStats,
    key_tokens,
    neuron_vocab_stats,
    ov_singular_tokens,
    ov_top_pairs,
    qk_top_pairs,
    value_tokens,
)

__all__ = ["ActivationCache", "FactoredMatrix", "get_act_name"]
__all__ += ["IOIDataset", "ioi_dataset", "ioi_score", "mean_ablation_hooks"]
__all__ += ["PatchResult", "activation_patch", "logit_diff", "normalized_logit_diff"]
__all__ += ["path_patch", "path_patch_heads"]
__all__ += ["Attribution", "direct_logit_attribution", "process_weights"]
__all__ += ["LensResult", "TunedLens", "lens_kl", "logit_lens", "train_tuned_lens"]

__all__ += ["AnswerContributions", "ValueEdit", "edit_value_vector", "mlp_answer_contributions"]
__all__ += ["NeuronVocabStats", "key_tokens", "neuron_vocab_stats", "ov_singular_tokens"]
__all__ += ["ov_top_pairs", "qk_top_pairs", "value_tokens"]
__all__ += ["Correlations", "correlate", "load_correlations"]
__all__ += ["NeuronStats", "load_stats", "neuron_stats"]
