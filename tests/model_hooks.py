"""Test helpers that change a model's behaviour through forward hooks."""


class LogitBias:
    """Forward hook on the LM head adding `bias` to one token's logit (by default the end of turn).

    The hook acts on every forward, generation and teacher forcing alike, so it changes the model,
    not the consistency between the two. Use it as a context manager.
    """

    def __init__(self, policy, bias, token_id=None):
        self.handle = policy.model.lm_head.register_forward_hook(self._hook)
        self.token_id = policy.end_of_turn_token_id if token_id is None else token_id
        self.bias = bias

    def _hook(self, module, inputs, output):
        output = output.clone()
        output[..., self.token_id] += self.bias
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()
