"""The probe's vectors by checkpoint key, where in the network δH₁ comes from, and the prediction held against
the trainer's next checkpoint (model.save_vectors, model.next_checkpoint).

An HF Trainer run on the enumerable world writes checkpoint-1 and checkpoint-2; the probe on checkpoint-1 is
held against checkpoint-2. Its numbers are recomputed here from the files it wrote and the two checkpoints'
weight files, and, over many probes, against the exact answers of the enumerable world.
"""

import json
import math
import shutil
import lightning.pytorch as pl
import pytest
import torch
from enumerable_world import PROMPTS, exact_prompt, mean_grads
from probe_helpers import TRAINABLE, make_probe, prompt_batches
from safetensors.torch import load_file, save_file
from cli_helpers import cli_args, results_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import train
from probe_lightning.config import ProbeConfigError
from probe_lightning.data import ProbeDataModule
from probe_lightning.module import EntropyProbe
from probe_lightning.optimizer_state import no_optimizer_state, resolve_learning_rate
from probe_lightning.sampling import GenerationConfig
from probe_lightning.vectors import block_of, weight_key

pytestmark = pytest.mark.usefixtures("one_thread")
LEARNING_RATE = 1e-2


@pytest.fixture(scope="module")
def world_run(world, tmp_path_factory):
    """checkpoint-1 and checkpoint-2 of a 2-step HF Trainer run on the world model (constant η, AdamW), trained
    towards always saying "1" and so lowering the entropy: a step the entropy gradient sees clearly."""
    output_dir = tmp_path_factory.mktemp("world_run")
    ids = torch.full((8, 6), 2)
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=2, save_steps=1, per_device_train_batch_size=2,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=AutoModelForCausalLM.from_pretrained(world), args=args, train_dataset=dataset).train()
    return output_dir / "checkpoint-1", output_dir / "checkpoint-2"


@pytest.fixture(scope="module")
def probed(world, world_run, prompts_file, tmp_path_factory):
    """configs/sp.yaml on checkpoint-1 with save_vectors and next_checkpoint: (results.json, its folder, log)."""
    tmp_path = tmp_path_factory.mktemp("probed")
    first, second = world_run
    extra = ["--model.checkpoint", str(first), "--model.next_checkpoint", str(second), "--model.save_vectors", "true"]
    train.main(cli_args(world, prompts_file, tmp_path, "configs/sp.yaml", *extra))
    path = results_file(tmp_path)
    return json.loads(path.read_text()), path.parent


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_vectors_are_stored_under_the_checkpoints_weight_keys(probed, world_run):
    results, folder = probed
    vectors = load_file(str(folder / "vectors_probe0.safetensors"))
    keys = set(weights(world_run[0]))
    for prefix in ("x_bar", "grad_loss", "update"):
        assert {name.split("/", 1)[1] for name in vectors if name.startswith(prefix + "/")} == keys
    delta_h1 = sum(torch.dot(vectors[f"x_bar/{k}"].double().flatten(), vectors[f"update/{k}"].double().flatten())
                   for k in keys).item()  # fmt: skip
    assert delta_h1 == pytest.approx(results["delta_h1"], rel=1e-6)


def test_parameter_and_block_shares_add_up_to_delta_h1(probed, world_run):
    probe = probed[0]["probes"][0]
    assert set(probe["parameter_shares"]) == set(weights(world_run[0]))
    assert sum(probe["parameter_shares"].values()) == pytest.approx(probe["delta_h1"], rel=1e-6)
    assert list(probe["block_shares"]) == ["embeddings", "layer 0", "layer 1", "final norm", "output head"]
    assert sum(probe["block_shares"].values()) == pytest.approx(probe["delta_h1"], rel=1e-6)
    assert probe["block_shares"]["output head"] == probe["parameter_shares"]["lm_head.weight"]


def test_the_checkpoints_learning_rate_wins_over_the_configs_default(probed):
    results = probed[0]
    assert results["learning_rate"] == pytest.approx(LEARNING_RATE) and "param groups" in results["learning_rate_source"]
    assert resolve_learning_rate(None, no_optimizer_state())[0] == 1e-6  # no checkpoint: TRL's default


def test_next_checkpoint_report_holds_the_prediction_against_the_real_step(probed, world_run):
    results, folder = probed
    nxt = results["probes"][0]["next_checkpoint"]
    vectors = load_file(str(folder / "vectors_probe0.safetensors"))
    before, after = weights(world_run[0]), weights(world_run[1])
    real = {k: after[k].double() - before[k].double() for k in before}
    predicted = {k: vectors[f"update/{k}"].double() for k in before}
    dot = sum((predicted[k] * real[k]).sum() for k in real).item()
    norms = [math.sqrt(sum((v[k] ** 2).sum().item() for k in real)) for v in (predicted, real)]
    along = sum((vectors[f"x_bar/{k}"].double() * real[k]).sum() for k in real).item()
    assert (nxt["steps"], nxt["global_step"]) == (1, 2) and "note" not in nxt
    assert nxt["cosine"] == pytest.approx(dot / (norms[0] * norms[1]), rel=1e-9)
    assert nxt["norm_ratio"] == pytest.approx(norms[0] / norms[1], rel=1e-9)
    assert nxt["delta_h_along_real"] == pytest.approx(along, rel=1e-6)
    assert nxt["delta_h_along_real_se"] > 0 and nxt["delta_h_true_se"] > 0 and 0 < nxt["ess"] <= 4 * results["G_E"]
    assert nxt["delta_h1"] == results["probes"][0]["delta_h1"]
    assert nxt["covariance_proxy"] == pytest.approx(-LEARNING_RATE * results["probes"][0]["covariance"])
    cosines = [row["cosine"] for row in nxt["least_aligned"]]
    assert len(cosines) == 5 and cosines == sorted(cosines) and cosines[0] >= -1
    page = (folder / "report.html").read_text()
    assert "Against the trainer's next checkpoint" in page and "each block's share" in page
    assert (folder / "block_shares_probe0.png").stat().st_size > 0


def test_weight_keys_and_blocks_follow_the_checkpoint_formats():
    lora = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert weight_key(lora, "hf_lora") == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert weight_key("lm_head.weight", "lightning", "model.") == "model.lm_head.weight"
    assert weight_key("model.norm.weight", "hf_full") == "model.norm.weight"
    blocks = {
        "model.embed_tokens.weight": "embeddings", "model.layers.12.mlp.up_proj.weight": "layer 12",
        "model.norm.weight": "final norm", "lm_head.weight": "output head", "transformer.wte.weight": "embeddings",
        "transformer.h.3.attn.c_attn.weight": "layer 3", "transformer.ln_f.weight": "final norm",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": "layer 0",
    }  # fmt: skip
    assert {key: block_of(key) for key in blocks} == blocks


def test_along_the_real_step_and_the_true_change_match_the_exact_world(world, world_run, tmp_path):
    """Over 60 probes: the mean of ⟨X̄, Δθ_real⟩ is ⟨∇H̄_E, Δθ_real⟩ and the mean true change is H(θ′) − H(θ)
    on the V prompts, both computed exactly by enumeration; the SEs are calibrated to the probes' spread.
    The output layer is the trainable part (as in the other exactness tests), and the next checkpoint moves it
    along the exact entropy gradient, a step the estimators must see clearly (any later weights would do)."""
    first = world_run[0]
    tokenizer = AutoTokenizer.from_pretrained(world)
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float64)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(TRAINABLE))
    exact_before = [exact_prompt(model, tokenizer, p) for p in PROMPTS]
    (grad_h,) = mean_grads([p.entropy_grad for p in exact_before])  # every E prompt equally often
    real = 0.5 * grad_h / grad_h.norm()
    later = shutil.copytree(world_run[1], tmp_path / "checkpoint-2")
    stored = weights(first)
    stored["lm_head.weight"] = (model.lm_head.weight.detach() + real).float()
    save_file(stored, str(later / "model.safetensors"), metadata={"format": "pt"})
    real = stored["lm_head.weight"].double() - model.lm_head.weight.detach()  # as stored, in float32

    probe = make_probe(
        world, checkpoint=str(first), next_checkpoint=str(later), update="identity", G=4, standard_error=False
    )
    rows = []
    for k in range(60):
        for batch in prompt_batches(k, PROMPTS * 6, PROMPTS, 256, evaluation_prompts=PROMPTS * 6):
            probe.step(batch)
        rows.append(probe.results.probes[-1].next_checkpoint)

    exact_along = torch.dot(grad_h.flatten(), real.flatten()).item()
    with torch.no_grad():
        model.lm_head.weight += real
    exact_true = sum(exact_prompt(model, tokenizer, p).entropy - e.entropy for p, e in zip(PROMPTS, exact_before)) / 4
    for key, exact in (("delta_h_along_real", exact_along), ("delta_h_true", exact_true)):
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        reported_se = torch.tensor([row[f"{key}_se"] for row in rows], dtype=torch.float64).pow(2).mean().sqrt()
        spread = values.std()
        assert 0.6 < (reported_se / spread).item() < 1.6, f"{key}: SE {reported_se:.3g}, spread {spread:.3g}"
        se_of_mean = spread / math.sqrt(len(values))
        assert se_of_mean < 0.1 * abs(exact), f"{key}: no power ({se_of_mean:.3g} vs {exact:.3g})"
        assert abs(values.mean() - exact) < 3 * se_of_mean, f"{key}: {values.mean():.4g} vs exact {exact:.4g}"


# ---- bad input: one line naming the flag and the fix ----


def test_a_folder_that_is_not_a_checkpoint_is_refused(world, world_run, tmp_path):
    with pytest.raises(ProbeConfigError, match=r"model.next_checkpoint .* is not a checkpoint .*pass a later"):
        make_probe(world, checkpoint=str(world_run[0]), next_checkpoint=str(tmp_path), trainable=None)


def test_an_earlier_checkpoint_is_refused(world, world_run):
    first, second = world_run
    with pytest.raises(ProbeConfigError, match="is at global_step 1, not after model.checkpoint's 2"):
        make_probe(world, checkpoint=str(second), next_checkpoint=str(first), trainable=None)


def test_a_checkpoint_of_another_model_is_refused_naming_both(world, world_run, tmp_path):
    other = tmp_path / "checkpoint-2"
    shutil.copytree(world_run[1], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ProbeConfigError, match=r"another model: its config.json has hidden_size=32, .* hidden_size=16"):
        make_probe(world, checkpoint=str(world_run[0]), next_checkpoint=str(other), trainable=None)


def test_a_next_checkpoint_needs_the_checkpoint_it_follows(world, world_run):
    with pytest.raises(ProbeConfigError, match="model.next_checkpoint needs model.checkpoint"):
        make_probe(world, next_checkpoint=str(world_run[1]))


def test_vectors_with_no_callback_to_write_them_are_refused(world, prompts_file):
    module = EntropyProbe(model=world, G=2, save_vectors=True, generation=GenerationConfig(max_new_tokens=3))
    data = ProbeDataModule(source="jsonl", path=prompts_file, B_E=2, B_U=2)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, inference_mode=False, callbacks=[])
    with pytest.raises(ProbeConfigError, match="model.save_vectors true, but no callback writes .* add callbacks.DeltaH1Logger"):
        trainer.predict(module, datamodule=data, return_predictions=False)
