"""robustfeat: adversarial training with feature prioritization (attention) and L2 feature
regularization, and honest robustness evaluation.

    import robustfeat
    model = robustfeat.load_model("runs/mnist-at-reg-seed0")   # [0, 1] images -> logits
"""

__version__ = "0.1.0"

from .config import list_presets, load_config
from .eval import evaluate_model, evaluate_run, load_model
from .models import create_model, list_models
from .train import train

__all__ = [
    "__version__",
    "create_model",
    "evaluate_model",
    "evaluate_run",
    "list_models",
    "list_presets",
    "load_config",
    "load_model",
    "train",
]
