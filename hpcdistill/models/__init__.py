"""hpcdistill.models: loading (hub id, local dir, GGUF, bundled default), chat templates,
rollouts (`generate`) and per-token scoring (`score_rollouts`)."""

from hpcdistill.models.chat import multi_turn, render_prompt, render_response, single_turn
from hpcdistill.models.generation import Generation, generate
from hpcdistill.models.loading import ModelHandle, load_model, load_models, tiny_random_model
from hpcdistill.models.scoring import TokenScores, score_rollouts

__all__ = [
    "ModelHandle", "load_model", "load_models", "tiny_random_model",
    "render_prompt", "render_response", "single_turn", "multi_turn",
    "Generation", "generate",
    "TokenScores", "score_rollouts",
]
