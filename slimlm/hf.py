"""`slimlm.hf`: N:M sparse training (AST, naive, gmp) inside a stock `transformers.Trainer`
(slimlm/integrations/hf_trainer.py; docs/training.md, "AST inside a Hugging Face Trainer")."""
from .integrations.hf_trainer import EngineOrder, SparseTrainingCallback, TrainerParts, prepare

__all__ = ["prepare", "TrainerParts", "SparseTrainingCallback", "EngineOrder"]
