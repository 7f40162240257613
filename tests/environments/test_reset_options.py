"""reset(options=...) of both environments: unknown keys and non-dict options are refused with what is accepted."""

import gymnasium as gym
import pytest

import environments  # noqa: F401


@pytest.mark.parametrize(
    ("env_id", "options", "message"),
    [
        ("GeneralPoints-v0", {"card": ["HA", "S3", "CK", "D6"]}, r"unknown reset option\(s\) \['card'\]; this environment takes 'cards'"),
        ("GeneralPoints-v0", ["HA", "S3", "CK", "D6"], "reset options must be a dict or None"),
        ("VIRL-v0", {"routes": 0}, r"unknown reset option\(s\) \['routes'\]; this environment takes 'route'"),
        ("VIRL-v0", "route=0", "reset options must be a dict or None"),
    ],
)
def test_reset_refuses_unknown_or_malformed_options_with_what_it_takes(env_id, options, message):
    env = gym.make(env_id, modality="language")
    with pytest.raises(ValueError, match=message):
        env.reset(seed=0, options=options)
    # None and {} are the plain reset; the known option still works.
    assert env.reset(seed=0, options=None)[0] == env.reset(seed=0, options={})[0]
    known = {"cards": ["HA", "S3", "CK", "D6"]} if env_id == "GeneralPoints-v0" else {"route": 0}
    env.reset(seed=0, options=known)
