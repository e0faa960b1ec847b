"""The probe inside a training run: trl.py (a transformers TrainerCallback for TRL's GRPOTrainer)."""
