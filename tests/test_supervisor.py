"""The restart policy (`tidal.deploy.supervisor.RestartPolicy`), pure: backoff that doubles, is capped
and jittered; a limit of restarts per sliding window, past which a process stays down; its bounds on
`RestartConfig` and the deployment's `restarts:` section; exit codes in words."""

from __future__ import annotations

import random

import pytest

from tidal.config import RestartConfig
from tidal.deploy.config import DeploymentError, parse_deployment
from tidal.deploy.supervisor import RestartPolicy, exit_reason


def exact(**changes) -> RestartPolicy:
    return RestartPolicy(RestartConfig(jitter=0.0, **changes))


def test_backoff_doubles_within_the_window_and_is_capped():
    policy = exact(max_restarts=10, backoff_s=1.0, max_backoff_s=6.0, window_s=1000)
    assert [policy.on_exit("w", t) for t in range(6)] == [1.0, 2.0, 4.0, 6.0, 6.0, 6.0]
    assert policy.restarts("w", 5) == 6


def test_past_the_limit_a_process_stays_down_until_its_restarts_leave_the_window():
    policy = exact(max_restarts=3, window_s=60)
    assert all(policy.on_exit("w", t) is not None for t in (0, 1, 2))
    assert policy.on_exit("w", 3) is None  # a fourth exit within 60 s: it stays down
    assert policy.on_exit("w", 59.5) is None
    assert policy.on_exit("w", 60.5) == 4.0  # the restart at 0 left the window; two remain in it
    assert policy.restarts("w", 60.5) == 3


def test_a_process_healthy_for_a_window_starts_over_at_the_first_backoff():
    policy = exact(max_restarts=5, window_s=10)
    assert [policy.on_exit("w", t) for t in (0, 1, 2)] == [1.0, 2.0, 4.0]
    assert policy.on_exit("w", 100) == 1.0


def test_processes_are_counted_apart_and_forget_drops_a_history():
    policy = exact(max_restarts=1)
    assert policy.on_exit("a", 0) == 1.0
    assert policy.on_exit("b", 0) == 1.0
    assert policy.on_exit("a", 1) is None
    policy.forget("a")
    assert policy.on_exit("a", 2) == 1.0


def test_max_restarts_zero_never_restarts():
    assert exact(max_restarts=0).on_exit("w", 0) is None


def test_jitter_shortens_each_delay_by_up_to_its_fraction():
    policy = RestartPolicy(RestartConfig(max_restarts=1000, window_s=1e9, backoff_s=8, max_backoff_s=8, jitter=0.5),
                           random.Random(7))
    delays = [policy.on_exit("w", t) for t in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert max(delays) - min(delays) > 3.0  # spread, not lockstep


@pytest.mark.parametrize("changes", [{"max_restarts": -1}, {"window_s": 0}, {"backoff_s": 0}, {"jitter": 1.5},
                                     {"backoff_s": 10, "max_backoff_s": 5}])
def test_config_bounds(changes):
    with pytest.raises(ValueError):
        RestartConfig(**changes)


def test_the_deployment_section_builds_the_config_and_refuses_bad_values():
    workers = [{"role": "both"}]
    assert parse_deployment({"workers": workers}).restarts.build() == RestartConfig()
    section = parse_deployment({"workers": workers, "restarts": {"max_restarts": 2, "window_s": 60}}).restarts
    assert section.build() == RestartConfig(max_restarts=2, window_s=60)
    with pytest.raises(DeploymentError, match="restarts.jitter"):
        parse_deployment({"workers": workers, "restarts": {"jitter": 2}})
    with pytest.raises(DeploymentError, match="max_backoff_s"):
        parse_deployment({"workers": workers, "restarts": {"backoff_s": 10, "max_backoff_s": 1}})


def test_exit_reasons():
    assert exit_reason(3) == "exited with code 3"
    assert exit_reason(-9) == "was killed by SIGKILL"
    assert exit_reason(-15) == "was killed by SIGTERM"
