"""build_probe: the one place a Probe is put together: its optimizer state, η and update geometry resolved
once, and the run's settings recorded for results.json."""

from probe_lightning.checkpoints import LoadedCheckpoint, trainable_parameters
from probe_lightning.config import require
from probe_lightning.next_checkpoint import load_next_checkpoint
from probe_lightning.optimizer_state import load_optimizer_state, no_optimizer_state, resolve_learning_rate
from probe_lightning.probe import Probe
from probe_lightning.results import RunInfo, RunResults, later_steps, run_notes
from probe_lightning.reward_functions import RewardFunctions
from probe_lightning.rollout import RolloutMaker
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor
from probe_lightning.settings import ProbeSettings
from probe_lightning.update import UpdateGeometry
from probe_lightning.vectors import weight_key


def sampling_identity(config: GenerationConfig) -> dict:
    """The generation settings a set of sampled responses depends on (not batch sizes)."""
    keys = ("max_new_tokens", "temperature", "top_p", "pad_token_id", "eos_token_id", "stop_strings")
    return {key: getattr(config, key) for key in keys}


def build_probe(
    processor: SequenceProcessor,
    settings: ProbeSettings,
    checkpoint: LoadedCheckpoint | None = None,
    rewards: RewardFunctions | None = None,
) -> Probe:
    """A Probe over the processor's model: its optimizer state, η and update geometry resolved once; rewards:
    the run's reward functions (the DataModule's), None: the built-in answer match."""
    named_params = trainable_parameters(processor.model)
    require(named_params, f"model {settings.model!r} has no trainable parameters")
    if checkpoint is not None:
        optimizer = checkpoint.optimizer
    elif settings.optimizer_state:
        optimizer = load_optimizer_state(settings.optimizer_state, named_params, settings.update != "identity")
    else:
        optimizer = no_optimizer_state()
    learning_rate, source = resolve_learning_rate(settings.learning_rate, optimizer)
    device = processor.device
    states = None if optimizer.adam_states is None else [s.to(device) for s in optimizer.adam_states]
    geometry = UpdateGeometry.build(settings.update, learning_rate, states)
    keys = [
        weight_key(name, checkpoint.format, checkpoint.weight_prefix) if checkpoint else name
        for name, _ in named_params
    ]
    next_checkpoint = None
    if settings.next_checkpoint:  # settings require a checkpoint with it
        next_checkpoint = load_next_checkpoint(
            settings.next_checkpoint, settings.checkpoint, checkpoint, named_params, keys
        )
    rewards = settings.reward_functions(rewards)  # with the trainer's reward_weights
    trainer = settings.trainer_settings
    info = RunInfo(
        model=settings.model,
        learning_rate=learning_rate,
        learning_rate_source=source,
        update=geometry.kind,
        entropy_target=settings.entropy_target,
        estimator=settings.estimator,
        trainer={name: {"value": value, "source": settings.trainer_sources[name]}
                 for name, value in vars(trainer).items()},
        G=settings.G,
        G_E=settings.G_E,
        use_sequence_processor=settings.sampling.use_sequence_processor,
        sampling=sampling_identity(processor.config),
        checkpoint=settings.checkpoint,
        checkpoint_format=checkpoint.format if checkpoint else None,
        global_step=checkpoint.global_step if checkpoint else None,
        next_checkpoint=settings.next_checkpoint,
        later_steps=later_steps(trainer),
        notes=run_notes(
            geometry.kind, settings.G, settings.G_E, settings.entropy_target, settings.estimator, trainer,
            settings.reference_source,
        ),
    )
    rollouts = RolloutMaker(
        processor, settings.sampling.use_sequence_processor, settings.G, settings.G_E, trainer.scale_rewards, rewards
    )
    return Probe(processor, rollouts, named_params, geometry, settings, RunResults(info), keys, next_checkpoint)
