"""A check that two runs sampled the same tokens, for tests that compare runs' numbers."""


def assert_same_samples(run: list[dict], reference: list[dict]) -> None:
    """Both runs (lists of metric lines) sampled the same tokens at every step they share, rollouts and validation
    episodes alike: only then can their numbers be compared. A failure here says so, instead of a mismatch of mu
    or of the weights that would hide its cause."""
    steps = {m["step"] for m in run} & {m["step"] for m in reference}
    assert steps, "the runs share no step"
    for key in ("rollout_digest", "validation_digest"):
        ours = [(m["step"], m.get(key)) for m in run if m["step"] in steps]
        theirs = [(m["step"], m.get(key)) for m in reference if m["step"] in steps]
        assert ours == theirs, f"{key}: the runs sampled different tokens at some step; compare them in float64"
