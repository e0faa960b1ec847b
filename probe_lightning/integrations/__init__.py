"""The probe inside a training run: core.py (InTrainingProbe, free of any framework), its adapters trl.py (a
transformers TrainerCallback for TRL's GRPOTrainer) and lightning.py (a Lightning Callback), and the live
optimizer's Adam state (live_optimizer.py)."""
