"""SequenceProcessor: sample G responses per prompt, then score them by teacher forcing under the same q.

q (docs/math.md) is what generation really samples from: softmax(z / temperature), then top-p
truncation. Teacher forcing applies transformers' own warpers, in generate's order, so the two agree.
"""

from dataclasses import dataclass, replace

import torch
import transformers
from torch.nn.functional import pad
from transformers import LogitsProcessorList

from probe_lightning.config import require
from probe_lightning.decoding import ResponseEnds, decode, packed_linears
from probe_lightning.progress import SamplingProgress
from probe_lightning.sampling import GenerationConfig, SeededDraws, SeededSampler
from probe_lightning.token_scores import head_token_scores, token_scores


@dataclass
class BatchedSequences:
    """B prompts x G responses, left-padded prompts of one common length P, then the responses.

    sequences:       [B, G, T] long, prompt tokens in [:, :, :P], response tokens after.
    attention_masks: [B, G, T] 1 on real prompt tokens and the gen_lens response tokens, else 0.
    prompt_lens:     B ints, all equal to P (the padded prompt length).
    gen_lens:        [B][G] response tokens, a generated EOS / stop string included, padding excluded.
    responses_text:  [B][G] decoded response tokens.
    pad_token_id:    the token filling prompts on the left and responses after they end.
    token_logprobs:  [B, G, T - P] log q of each response token as generation drew it, 0 after the end;
                     None where generation did not record it (model.generate, rollouts saved without it).
    token_entropies: [B, G, T - P] the entropy of q at each response step, as generation computed it.
    """

    sequences: torch.Tensor
    attention_masks: torch.Tensor
    prompt_lens: list[int]
    gen_lens: list[list[int]]
    responses_text: list[list[str]]
    pad_token_id: int
    token_logprobs: torch.Tensor | None = None
    token_entropies: torch.Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_responses_per_prompt(self) -> int:
        return self.sequences.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.num_prompts * self.num_responses_per_prompt

    @property
    def prompt_len(self) -> int:
        return self.prompt_lens[0]

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, G, T - P] 1 on counted response tokens."""
        return self.attention_masks[:, :, self.prompt_len :]

    def select(self, prompts: slice) -> "BatchedSequences":
        """The sub-batch of prompts[prompts], all G responses of each."""
        return replace(
            self,
            sequences=self.sequences[prompts],
            attention_masks=self.attention_masks[prompts],
            prompt_lens=self.prompt_lens[prompts],
            gen_lens=self.gen_lens[prompts],
            responses_text=self.responses_text[prompts],
            token_logprobs=None if self.token_logprobs is None else self.token_logprobs[prompts],
            token_entropies=None if self.token_entropies is None else self.token_entropies[prompts],
        )

    def responses(self, pairs: list[tuple[int, int]]) -> "BatchedSequences":
        """The sub-batch of the given (prompt, response) pairs, each as a prompt of one response (scores unrecorded)."""
        b, g = (torch.tensor(index, device=self.sequences.device) for index in zip(*pairs))
        return replace(
            self,
            sequences=self.sequences[b, g][:, None],
            attention_masks=self.attention_masks[b, g][:, None],
            prompt_lens=[self.prompt_len] * len(pairs),
            gen_lens=[[self.gen_lens[i][j]] for i, j in pairs],
            responses_text=[[self.responses_text[i][j]] for i, j in pairs],
            token_logprobs=None,
            token_entropies=None,
        )

    def to(self, device: torch.device | str) -> "BatchedSequences":
        scores = {name: getattr(self, name) for name in ("token_logprobs", "token_entropies")}
        return replace(
            self, sequences=self.sequences.to(device), attention_masks=self.attention_masks.to(device),
            **{name: None if value is None else value.to(device) for name, value in scores.items()},
        )  # fmt: skip

    def left_padded(self, extra: int) -> "BatchedSequences":
        """The same sequences with `extra` more padding columns before every prompt: an equally valid
        float32 evaluation of the same numbers (how far apart the two are is the forward's resolution)."""
        B, G, _ = self.sequences.shape
        pad = torch.full((B, G, extra), self.pad_token_id, dtype=self.sequences.dtype, device=self.sequences.device)
        masked = torch.zeros_like(pad, dtype=self.attention_masks.dtype)
        return replace(
            self,
            sequences=torch.cat([pad, self.sequences], dim=2),
            attention_masks=torch.cat([masked, self.attention_masks], dim=2),
            prompt_lens=[n + extra for n in self.prompt_lens],
        )


@dataclass
class TeacherForcing:
    """Scores of a BatchedSequences under q. R = T - P response positions; zeros off the response mask."""

    token_logprobs: torch.Tensor  # [B, G, R] log q(y_t | p, y_<t), float32
    token_entropies: torch.Tensor  # [B, G, R] entropy H_t of q(. | p, y_<t), float32, graph kept iff with_grad
    seq_logprobs: torch.Tensor  # [B, G] S(y): sum of token_logprobs
    response_mask: torch.Tensor  # [B, G, R]

    def detached(self) -> "TeacherForcing":
        return TeacherForcing(
            self.token_logprobs.detach(), self.token_entropies.detach(), self.seq_logprobs.detach(), self.response_mask
        )


class SequenceProcessor:
    def __init__(self, model, tokenizer, config: GenerationConfig):
        self.model = model
        self.tokenizer = tokenizer
        if config.pad_token_id is None:
            config = replace(config, pad_token_id=tokenizer.pad_token_id)
        if config.eos_token_id is None:
            config = replace(config, eos_token_id=tokenizer.eos_token_id)
        require(config.max_new_tokens is not None, "generation.max_new_tokens is not set")
        self.config = config
        self.head = self._linear_head()  # (name, weight) of a plain linear output layer, else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- generation ----

    def encode_prompts(self, prompts: list[str] | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P] input ids and attention mask on the model's device, prompts left-padded to one length P.

        prompts: token ids (data.prompt_token_ids: as TRL's trainer tokenizes them), or formatted texts,
        tokenized without special tokens (a chat template already holds them).
        """
        if prompts and isinstance(prompts[0], str):
            encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            return encoded.input_ids.to(self.device), encoded.attention_mask.to(self.device)
        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([[self.config.pad_token_id] * (width - len(ids)) + list(ids) for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate_batched(
        self,
        prompts: list[str] | list[list[int]],
        G: int,
        gen_batch_size: int | None = None,
        seeds: list[int] | None = None,
    ) -> BatchedSequences:
        """Sample G responses for each prompt (token ids or formatted text, see encode_prompts), about
        gen_batch_size sequences per call.

        seeds: one per response (prompt-major): the probe's own sampling loop (decoding.py), each response
        drawn from its own generator, so it depends on its seed only, not on the batch or the process it is
        sampled in; whole prompts per call. None: model.generate with torch's global generator.
        """
        require(G >= 1, f"G must be >= 1, got {G}")
        gen_batch_size = gen_batch_size or self.config.gen_batch_size
        ids, mask = self.encode_prompts(prompts)
        if seeds is None:
            return self._generate(ids, mask, G, gen_batch_size)
        require(len(seeds) == len(prompts) * G, f"{len(seeds)} seeds for {len(prompts)} prompts x G={G} responses")
        per_call = max(1, gen_batch_size // G)  # prompts per call
        calls = []
        progress = SamplingProgress(len(seeds))
        with packed_linears(self.model, rows=min(len(seeds), per_call * G)):
            for start in range(0, len(prompts), per_call):
                rows = slice(start * G, (start + per_call) * G)
                sampler = SeededSampler(seeds[rows], self.device)
                ends = ResponseEnds(self.tokenizer, self.config.eos_token_ids, self.config.stop_strings,
                                    len(seeds[rows]))  # fmt: skip
                calls.append(decode(
                    self.model, ids[start : start + per_call], mask[start : start + per_call], G, sampler,
                    self.config.logits_warper(), ends, self.config.max_new_tokens, self.config.pad_token_id, progress,
                ))  # fmt: skip
        progress.close()
        width = max(call.responses.shape[1] for call in calls)

        def joined(name: str, value) -> torch.Tensor:
            parts = [getattr(call, name) for call in calls]
            return torch.cat([pad(part, (0, width - part.shape[1]), value=value) for part in parts])

        batch = self.assemble(ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0),
                              joined("responses", self.config.pad_token_id), G)  # fmt: skip
        B, R = len(prompts), width
        return replace(batch, token_logprobs=joined("token_logprobs", 0.0).view(B, G, R),
                       token_entropies=joined("token_entropies", 0.0).view(B, G, R))  # fmt: skip

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, G: int, gen_batch_size: int) -> BatchedSequences:
        """model.generate, gen_batch_size sequences per call, sampling with torch's global generator."""
        prompt_ids, prompt_mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
        chunks = []
        for start in range(0, prompt_ids.shape[0], gen_batch_size):
            rows = slice(start, start + gen_batch_size)
            chunks.append(self.sample(prompt_ids[rows], prompt_mask[rows])[:, ids.shape[1] :])
        width = max(chunk.shape[1] for chunk in chunks)
        responses = torch.cat([pad(c, (0, width - c.shape[1]), value=self.config.pad_token_id) for c in chunks])
        return self.assemble(prompt_ids, prompt_mask, responses, G)

    def assemble(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor, G: int
    ) -> BatchedSequences:
        """[B*G, P] prompts (each repeated G times) + [B*G, R] generated tokens -> BatchedSequences."""
        gen_lens = self.response_lengths(responses)
        response_mask = torch.arange(responses.shape[1], device=responses.device)[None, :] < gen_lens[:, None]
        sequences = torch.cat([prompt_ids, responses], dim=1)
        masks = torch.cat([prompt_mask, response_mask.long()], dim=1)
        texts = [
            self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(responses, gen_lens.tolist())
        ]
        B = prompt_ids.shape[0] // G
        return BatchedSequences(
            sequences=sequences.view(B, G, -1),
            attention_masks=masks.view(B, G, -1),
            prompt_lens=[prompt_ids.shape[1]] * B,
            gen_lens=gen_lens.view(B, G).tolist(),
            responses_text=[texts[b * G : (b + 1) * G] for b in range(B)],
            pad_token_id=self.config.pad_token_id,
        )

    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_return_sequences: int = 1,
        seeds: list[int] | None = None,
    ):
        """One model.generate call sampling from q: [N, P] prompts -> [N * num_return_sequences, P + R].

        seeds (one per output row): each row drawn by SeededSampler from its own generator, as the probe's
        own loop draws it, instead of generate's batch-wide multinomial (the bench's bare minimum).
        """
        hf_config = self.config.to_hf()
        hf_config.num_return_sequences = num_return_sequences
        processors = None
        if seeds is not None:  # greedy generate refuses num_return_sequences: the rows are repeated here
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
            hf_config.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_return_sequences=1)
            processors = LogitsProcessorList([*self.config.logits_warper(), SeededDraws(seeds, self.device)])
        # Swap in a blank model generation config so a checkpoint's own sampling defaults
        # (top_k, min_p, repetition penalty, ...) cannot leak into q.
        saved, self.model.generation_config = self.model.generation_config, transformers.GenerationConfig()
        try:
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=hf_config,
                logits_processor=processors,
                tokenizer=self.tokenizer,
            )
        finally:
            self.model.generation_config = saved

    def response_lengths(self, responses: torch.Tensor) -> torch.Tensor:
        """Tokens up to and including the first EOS or the token completing a stop string."""
        width = responses.shape[1]
        lengths = torch.full((responses.shape[0],), width, dtype=torch.long, device=responses.device)
        eos_ids = self.config.eos_token_ids
        if eos_ids:
            is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, width)
            lengths = torch.minimum(lengths, first)
        if self.config.stop_strings:
            ends = [self._stop_string_end(row[:n]) for row, n in zip(responses.tolist(), lengths.tolist())]
            lengths = torch.minimum(lengths, torch.tensor(ends, device=responses.device))
        return lengths

    def _stop_string_end(self, tokens: list[int]) -> int:
        """Tokens up to the one completing the first stop string, by the sampling loop's own rule."""
        ends = ResponseEnds(self.tokenizer, [], self.config.stop_strings, num_rows=1)
        return next((i + 1 for i, token in enumerate(tokens) if ends.completes_stop_string(0, token)), len(tokens))

    # ---- teacher forcing ----

    def microbatches(self, num_prompts: int, G: int) -> list[slice]:
        """Prompt slices of one teacher-forcing forward each: tf_batch_size // G whole prompts, at least one."""
        per_forward = max(1, self.config.tf_batch_size // G)
        return [slice(start, start + per_forward) for start in range(0, num_prompts, per_forward)]

    def teacher_force_logprobs(
        self,
        batch: BatchedSequences,
        with_grad: bool = False,
        parameters: dict[str, torch.Tensor] | None = None,
    ) -> TeacherForcing:
        """Per-token log q, per-token entropies and S for every response; graph kept iff with_grad.

        One forward per microbatch of whole prompts (see GenerationConfig.tf_batch_size).
        parameters: replacements for some of the model's parameters by name (torch.func.functional_call),
        e.g. the primals of a forward-mode jvp.
        """
        if with_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "teacher_force_logprobs(with_grad=True) ran under torch.inference_mode, where no gradient can "
                "exist; run the probe with trainer.inference_mode: false"
            )
        B, G, T = batch.sequences.shape
        P = batch.prompt_len
        logprobs, entropies = [], []
        with torch.enable_grad() if with_grad else torch.no_grad():
            for rows in self.microbatches(B, G):
                ids = batch.sequences[rows].flatten(0, 1)
                lp, ent = self._score(ids, batch.attention_masks[rows].flatten(0, 1), P, with_grad, parameters)
                logprobs.append(lp)
                entropies.append(ent)
            response_mask = batch.response_mask.bool()
            # where, not a product: padding after a response may lie outside top-p, where log q = -inf.
            token_logprobs = torch.cat(logprobs).view(B, G, T - P).where(response_mask, 0.0)
            token_entropies = torch.cat(entropies).view(B, G, T - P).where(response_mask, 0.0)
            return TeacherForcing(token_logprobs, token_entropies, token_logprobs.sum(-1), response_mask.float())

    def _score(self, ids, masks, prompt_len, with_grad, parameters):
        inputs = dict(
            input_ids=ids,
            attention_mask=masks,
            position_ids=(masks.cumsum(-1) - 1).clamp(min=0),  # as generate numbers left-padded prompts
            # Only the logits predicting response tokens, positions P-1 .. T-2: indexing the hidden
            # states, not slicing the logits, whose backward would zero-fill a logits-sized tensor.
            logits_to_keep=torch.arange(prompt_len - 1, ids.shape[1] - 1, device=ids.device),
            use_cache=False,
        )
        targets, warper = ids[:, prompt_len:], self.config.logits_warper()
        head = self.head
        if head is None:  # an output layer that is not a plain linear map: from its logits
            return token_scores(self._forward(inputs, parameters).logits, targets, warper, with_grad)
        # From the final hidden states: the model computes no logits at all (an empty logits_to_keep).
        hidden = {}

        def keep(module, args, output):
            hidden["states"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        hook = self.model.get_decoder().register_forward_hook(keep)
        try:
            self._forward({**inputs, "logits_to_keep": inputs["logits_to_keep"][:0]}, parameters)
        finally:
            hook.remove()
        name, weight = head
        weight = weight if parameters is None else parameters.get(name, weight)
        states = hidden["states"][:, prompt_len - 1 : ids.shape[1] - 1]
        return head_token_scores(states, weight, targets, warper, with_grad)

    def _forward(self, inputs: dict, parameters: dict[str, torch.Tensor] | None):
        if parameters is None:
            return self.model(**inputs)
        return torch.func.functional_call(self.model, parameters, args=(), kwargs=inputs)

    def _linear_head(self) -> tuple[str, torch.Tensor] | None:
        """(name, weight) of the output layer when logits = hidden @ weightᵀ exactly, else None."""
        head, config = self.model.get_output_embeddings(), self.model.config
        plain = type(head) is torch.nn.Linear and head.bias is None
        if not plain or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            return None
        return next((n, p) for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight)
