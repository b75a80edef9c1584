"""Running slimlm's methods inside other training frameworks (`hf_trainer`: a stock transformers.Trainer)."""
