"""Saved rollouts (data.save_rollouts, data.rollouts): the on-disk format and the identity a replay must match.

A run's `rollouts/` folder, beside its results.json, holds
- identity.json: what the samples depend on (model, checkpoint, G, G_E, generation path, sampling settings),
  the roles saved ("roles") and, for the record, the data settings that drew the prompts;
- probe_<k>/: probe k's rollouts as a `datasets` folder (`datasets.load_from_disk`), one row per prompt,
  in the order the probe consumed them, with the rewards they were given.

A folder may hold U batches alone ("roles": ["U"]), e.g. a trainer's real batch (trainer_batch.py); a replay then draws and samples each probe's E (and V) batches itself, and
identity entries that tool cannot know (G_E) are null, which a replay does not check.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch

from probe_lightning.config import ProbeConfigError, require
from probe_lightning.sequence_processor import BatchedSequences

IDENTITY_FILE = "identity.json"
# The identity a replay must share with the run that sampled the rollouts, and each entry's flag.
IDENTITY_FLAGS = {
    "model": "model.model",
    "checkpoint": "model.checkpoint",
    "G": "model.G",
    "G_E": "model.G_E",
    "use_sequence_processor": "model.sampling.use_sequence_processor",
}
# One row per prompt; its G responses share the batch's length T (padded prompt, then response tokens).
FEATURES = datasets.Features(
    {
        "probe_index": datasets.Value("int32"),
        "batch_index": datasets.Value("int32"),  # the rollout batch within the probe, in consumption order
        "role": datasets.Value("string"),
        "last_in_probe": datasets.Value("bool"),
        "prompt_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "prompt_len": datasets.Value("int32"),  # P, the batch's padded prompt length
        "sequences": datasets.List(datasets.List(datasets.Value("int64"))),  # [G][T] token ids
        "attention_masks": datasets.List(datasets.List(datasets.Value("int8"))),  # [G][T]
        "gen_lens": datasets.List(datasets.Value("int32")),  # [G]
        "responses_text": datasets.List(datasets.Value("string")),  # [G]
        "rewards": datasets.List(datasets.Value("float32")),  # [G] as the reward functions gave them
        "prompt": datasets.Value("string"),  # TRL's prompt (text or chat messages) as JSON
        "columns": datasets.Value("string"),  # the row's other columns, the reward functions' arguments, as JSON
        # [G][T - P] as generation computed them (BatchedSequences), null where it did not
        "token_logprobs": datasets.List(datasets.List(datasets.Value("float32"))),
        "token_entropies": datasets.List(datasets.List(datasets.Value("float32"))),
    }
)


def write_identity(folder: Path, identity: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IDENTITY_FILE).write_text(json.dumps(identity, indent=2))


def read_identity(folder: str | Path) -> dict:
    path = Path(folder) / IDENTITY_FILE
    require(
        path.exists(),
        f"data.rollouts: no saved rollouts in {str(folder)!r} (no {IDENTITY_FILE}): pass the rollouts/ folder "
        f"of a run made with --data.save_rollouts true",
    )
    return json.loads(path.read_text())


def update_only(identity: dict, folder: str | Path) -> bool:
    """Whether the folder holds U batches alone (identity "roles": ["U"]); folders saved before "roles" hold all."""
    roles = identity.get("roles", ["E", "U"])
    require(
        roles == ["U"] or "E" in roles,
        f"data.rollouts {str(folder)!r}: identity.json roles {roles} have U batches with other roles but no E: "
        f'save every role, or U alone ("roles": ["U"])',
    )
    return roles == ["U"]


def check_replay(saved: dict, run: dict, folder: str) -> None:
    """Refuse, in one line naming each differing setting with both values, rollouts sampled otherwise; a saved
    null (what the saving tool could not know) is not checked."""
    run = json.loads(json.dumps(run))  # tuples and lists compare as JSON stores them
    sampling = saved.get("sampling") or {}
    settings = [(flag, saved.get(key), run[key]) for key, flag in IDENTITY_FLAGS.items()]
    settings += [(f"model.generation.{key}", sampling.get(key), now) for key, now in run["sampling"].items()]
    differences = [
        f"{flag}={was!r} (this run: {now!r})" for flag, was, now in settings if was is not None and was != now
    ]
    if differences:
        raise ProbeConfigError(
            f"data.rollouts {folder!r} were sampled with {', '.join(differences)}: replay them with the saved "
            f"settings, or drop data.rollouts to sample anew"
        )


def save_probe(folder: Path, probe_index: int, rows: list[dict]) -> None:
    datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(folder / f"probe_{probe_index}"))


def saved_batches(folder: str | Path) -> Iterator[tuple[dict, BatchedSequences, bool]]:
    """Each saved rollout batch in consumption order, as (its rows' columns, its sequences, whether it is its
    probe's last); a probe's folder is memory-mapped, and only the batch being yielded is read into memory."""
    pad_token_id = (read_identity(folder).get("sampling") or {}).get("pad_token_id")
    require(
        pad_token_id is not None,
        f"data.rollouts {str(folder)!r}: identity.json has no sampling.pad_token_id: write the token the saved "
        f"sequences are padded with",
    )
    parts = sorted(Path(folder).glob("probe_*"), key=lambda part: int(part.name.removeprefix("probe_")))
    require(parts, f"data.rollouts {str(folder)!r} holds no probe_<k> folders: no probe finished in that run")
    for part in parts:
        rows = datasets.load_from_disk(str(part))
        batch_index = rows["batch_index"]
        starts = [i for i in range(len(batch_index)) if i == 0 or batch_index[i] != batch_index[i - 1]]
        bounds = list(zip(starts, [*starts[1:], len(batch_index)]))
        for number, (start, stop) in enumerate(bounds):
            columns = rows[start:stop]
            generation_scores = {
                name: torch.tensor(columns[name], dtype=torch.float32)
                for name in ("token_logprobs", "token_entropies")
                if None not in columns.get(name, [None])  # saved without them: teacher forcing gives them
            }  # fmt: skip
            sequences = BatchedSequences(
                sequences=torch.tensor(columns["sequences"], dtype=torch.long),
                attention_masks=torch.tensor(columns["attention_masks"], dtype=torch.long),  # as generation's
                prompt_lens=columns["prompt_len"],
                gen_lens=columns["gen_lens"],
                responses_text=columns["responses_text"],
                pad_token_id=pad_token_id,
                **generation_scores,
            )
            yield columns, sequences, number == len(bounds) - 1


def saved_prompts(columns: dict) -> list | None:
    """The batch's TRL prompts; None for rollouts saved before they were (each question as one user turn)."""
    return [json.loads(prompt) for prompt in columns["prompt"]] if "prompt" in columns else None


def saved_columns(columns: dict) -> list[dict] | None:
    """The batch's reward-function columns; None for rollouts saved before they were (the answer alone)."""
    return [json.loads(row) for row in columns["columns"]] if "columns" in columns else None
