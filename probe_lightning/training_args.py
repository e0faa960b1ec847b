"""The user's trainer settings: explicit config, else the checkpoint's training_args.bin, else TRL's defaults.

HF Trainer saves its TrainingArguments (TRL: GRPOConfig) in checkpoint-N/training_args.bin with torch.save,
i.e. a pickle, and unpickling runs whatever the file names. The file is read with a restricted unpickler:
every class it references must come from transformers, trl or accelerate (or be torch.device) and is replaced
by an inert record that only keeps its arguments and state, so no constructor or function from the file ever
runs, and neither trl nor transformers needs to be importable.

With use_adaptive_entropy the trainer's entropy controller state (the coefficient and the entropy it last
measured) is saved beside it, in entropy_ctrl_state.json: the next step's bonus comes from there.
"""

import json
import logging
import math
import pickle
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

from probe_lightning.config import ProbeConfigError
from probe_lightning.trainer_loss import ENTROPY_CONTROLLER_FILE, TrainerSettings

log = logging.getLogger(__name__)

TRAINING_ARGS_FILE = "training_args.bin"
# TrainerSettings' GRPOConfig fields (the controller state is not one: it comes from ENTROPY_CONTROLLER_FILE).
SETTING_NAMES = tuple(field.name for field in fields(TrainerSettings) if "saved_in" not in field.metadata)
ALLOWED_PACKAGES = ("transformers", "trl", "accelerate")
ALLOWED_GLOBALS = {("torch", "device")}


class _Record:
    """An inert stand-in for a pickled object: its class's name, constructor arguments and state."""

    module, name = "", ""

    def __new__(cls, *args, **kwargs):
        record = super().__new__(cls)
        record.args, record.state = args, None
        return record

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] not in ALLOWED_PACKAGES and (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return type(name, (_Record,), {"module": module, "name": name})

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a tensor: training arguments hold none")


class UnreadableTrainingArgs(ValueError):
    """training_args.bin exists but cannot be read safely; the message says why."""


def read_training_args(folder: str | Path) -> dict[str, object] | None:
    """The probe's settings saved in folder/training_args.bin ({name: value}, those present); None if no file.

    Raises UnreadableTrainingArgs for a file that is not a torch.save'd TrainingArguments read safely.
    Old TRL saved scale_rewards as a bool (True = "group", False = "none"); HF's max_grad_norm 0 means no clipping.
    """
    path = Path(folder) / TRAINING_ARGS_FILE
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            with archive.open(pickled) as data:
                root = _RestrictedUnpickler(data).load()
    except Exception as error:  # a malformed pickle fails in many ways; none of them may stop the probe
        raise UnreadableTrainingArgs(f"{path}: {str(error) or type(error).__name__}") from None
    if not isinstance(root, _Record) or not isinstance(root.state, dict) or "learning_rate" not in root.state:
        raise UnreadableTrainingArgs(f"{path}: not a TrainingArguments object")
    values = {name: root.state[name] for name in SETTING_NAMES if name in root.state}
    if isinstance(values.get("scale_rewards"), bool):
        values["scale_rewards"] = "group" if values["scale_rewards"] else "none"
    if values.get("max_grad_norm") is not None and values["max_grad_norm"] <= 0:
        values["max_grad_norm"] = None
    return values


# Without a checkpoint folder there is no trainer to follow: the probe's own defaults stand in for TRL's
# num_generations 8 and max_completion_length, so a first run is cheap (G = 4 already gives mixed outcomes
# on the built-in task). With a checkpoint, its training_args.bin (else TRL's defaults) decide.
PROBE_DEFAULTS = {"num_generations": 4, "max_completion_length": 64}


def read_entropy_controller(folder: str | Path) -> dict[str, float] | None:
    """The adaptive entropy controller's state GRPOTrainer saved in folder/entropy_ctrl_state.json
    ({"entropy_coef", "last_world_entropy"}); None if there is no such file."""
    path = Path(folder) / ENTROPY_CONTROLLER_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        return {name: float(state[name]) for name in ("entropy_coef", "last_world_entropy")}
    except (ValueError, KeyError, TypeError) as error:
        raise ProbeConfigError(
            f"{path} is not the entropy controller state GRPOTrainer writes ({type(error).__name__}: {error}): "
            "re-save the checkpoint or point model.checkpoint at another one"
        ) from None


def resolve_trainer_settings(
    config_values: dict[str, object | None], checkpoint_folder: str | Path | None
) -> tuple[TrainerSettings, dict[str, str]]:
    """TrainerSettings and each value's source: "config" (not None in config_values) over "checkpoint" over
    "default" (TRL's GRPOConfig default; without a checkpoint folder, PROBE_DEFAULTS for the batch shape). A
    config value that differs from the checkpoint's is marked "config (checkpoint had X)". A checkpoint folder
    whose training_args.bin is missing or unreadable gives one warning listing every value assumed by default.
    Unclipped training: max_grad_norm 0 in config. With use_adaptive_entropy, the entropy controller's saved
    state gives entropy_coef and last_world_entropy (without one: TRL's initial state, no measurement yet).
    """
    unknown = set(config_values) - set(SETTING_NAMES)
    if unknown:
        raise ProbeConfigError(f"unknown trainer settings {sorted(unknown)}; known: {SETTING_NAMES}")
    saved, problem = {}, None
    if checkpoint_folder is not None:
        try:
            saved = read_training_args(checkpoint_folder)
        except UnreadableTrainingArgs as error:
            problem = f"{error}; the file was not loaded"
        if saved is None:
            saved, problem = {}, f"no {TRAINING_ARGS_FILE} in {checkpoint_folder}"
        elif problem is None and "num_generations" not in saved:  # a plain TrainingArguments (SFT, LM loss)
            problem = f"{checkpoint_folder}/{TRAINING_ARGS_FILE} holds no GRPO settings (not a GRPOConfig)"
    defaults = asdict(TrainerSettings()) | (PROBE_DEFAULTS if checkpoint_folder is None else {})
    values, sources = {}, {}
    for name in SETTING_NAMES:
        if config_values.get(name) is not None:
            values[name], sources[name] = config_values[name], "config"
            if name in saved and saved[name] != config_values[name]:
                sources[name] = f"config (checkpoint had {saved[name]!r})"
        elif name in saved:
            values[name], sources[name] = saved[name], "checkpoint"
        else:
            values[name], sources[name] = defaults[name], "default"
    assumed = [f"{name}={values[name]!r}" for name in SETTING_NAMES if sources[name] == "default"]
    if problem and assumed:
        log.warning(
            "trainer settings: %s; assuming TRL's defaults %s (model.G and model.generation.max_new_tokens set the "
            "batch shape)", problem, ", ".join(assumed),
        )  # fmt: skip
    _entropy_controller(values, sources, checkpoint_folder)
    return TrainerSettings(**values), sources


def _entropy_controller(values: dict, sources: dict[str, str], checkpoint_folder: str | Path | None) -> None:
    """With use_adaptive_entropy: entropy_coef and last_world_entropy as the controller saved them, the
    coefficient and gate the trainer applies at its next step (a configured entropy_coef still wins)."""
    values["last_world_entropy"], sources["last_world_entropy"] = None, "default"
    if not values["use_adaptive_entropy"]:
        return
    state = read_entropy_controller(checkpoint_folder) if checkpoint_folder is not None else None
    if state is None:
        sources["last_world_entropy"] = f"default (no {ENTROPY_CONTROLLER_FILE}: TRL's initial state, no measurement)"
        return
    saved = f"checkpoint ({ENTROPY_CONTROLLER_FILE})"
    measured = state["last_world_entropy"]
    values["last_world_entropy"] = measured if math.isfinite(measured) else None  # TRL's inf: none yet
    sources["last_world_entropy"] = saved
    if not sources["entropy_coef"].startswith("config"):
        values["entropy_coef"], sources["entropy_coef"] = state["entropy_coef"], saved
    elif values["entropy_coef"] != state["entropy_coef"]:
        sources["entropy_coef"] = f"config ({ENTROPY_CONTROLLER_FILE} had {state['entropy_coef']!r})"
