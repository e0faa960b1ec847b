"""Cross-cutting concerns of a probe run: batch invariants, δH₁ logging and results.json, memory, saved rollouts."""

from callbacks.delta_h1_logger import DeltaH1Logger
from callbacks.invariants import BatchInvariants, InvariantViolation
from callbacks.memory import MemoryMonitor
from callbacks.rollout_recorder import RolloutRecorder

__all__ = ["BatchInvariants", "DeltaH1Logger", "InvariantViolation", "MemoryMonitor", "RolloutRecorder"]
