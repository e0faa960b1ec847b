"""ProbeSums: one probe's ΣX, ΣY and counts; per-prompt losses are added to the sums by backward."""

import torch

NamedParams = list[tuple[str, torch.Tensor]]


class ProbeSums:
    """ΣX = Σ_{p∈E} X(p) and ΣY = Σ_{p∈U} ∇J(p) in float32, the prompt, response and token counts, and
    the reward and entropy sums of one probe (docs/math.md)."""

    def __init__(self, named_params: NamedParams):
        self.params = [p for _, p in named_params]
        self.sum_x = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.sum_y = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.num_entropy_prompts = 0
        self.num_update_prompts = 0
        self.reward_sum = 0.0
        self.num_responses = 0
        self.entropy_sum = 0.0
        self.num_tokens = 0

    def add_gradient(self, role: str, loss: torch.Tensor) -> None:
        """ΣX (role E) or ΣY (role U) += ∇loss, each parameter's gradient added as soon as backward
        completes it, then dropped.

        As in a plain loss.backward() into existing .grad, the whole gradient never exists at once
        (torch.autograd.grad would return all of it together: one more model-sized buffer at the peak).
        The parameters' own .grad are left as they were.
        """
        sums = self.sum_x if role == "E" else self.sum_y
        saved_grads = [p.grad for p in self.params]

        def add_into(total: torch.Tensor):
            def hook(param: torch.Tensor) -> None:
                total.add_(param.grad)
                param.grad = None

            return hook

        handles = [p.register_post_accumulate_grad_hook(add_into(total)) for p, total in zip(self.params, sums)]
        try:
            for p in self.params:
                p.grad = None
            loss.backward(inputs=self.params)
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(self.params, saved_grads):
                p.grad = grad

    def count(self, role: str, rewards: torch.Tensor, token_entropies: torch.Tensor, response_mask: torch.Tensor):
        """Prompts, responses and tokens of one rollout ([B, G] rewards, [B, G, R] entropies and mask)."""
        if role == "E":
            self.num_entropy_prompts += rewards.shape[0]
        else:
            self.num_update_prompts += rewards.shape[0]
        self.reward_sum += rewards.sum().item()
        self.num_responses += rewards.numel()
        self.entropy_sum += token_entropies.sum().item()
        self.num_tokens += int(response_mask.sum().item())

    @property
    def reward_mean(self) -> float:
        return self.reward_sum / max(self.num_responses, 1)

    @property
    def entropy_mean(self) -> float:
        return self.entropy_sum / max(self.num_tokens, 1)
