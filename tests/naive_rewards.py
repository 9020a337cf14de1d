"""Deliberately naive rewards, for `gpg-vlm check-reward` to find fault with (README, tests)."""


def substring_reward(completions, solution, **columns):
    """1.0 when the solution's text appears anywhere in the completion: the classic hackable reward."""
    out = []
    for completion, sol in zip(completions, solution):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(1.0 if str(sol).lower() in text.lower() else 0.0)
    return out


def hanging_reward(completions, **columns):
    """Never returns."""
    import time

    while True:
        time.sleep(1)


def hang_on_think_reward(completions, **columns):
    """Hangs on a completion whose answer is only inside <think>, scores 0 otherwise."""
    import time

    if any(isinstance(c, str) and c.startswith("<think>The answer is") for c in completions):
        while True:
            time.sleep(1)
    return [0.0 for _ in completions]


def dict_reward(completions, **columns):
    """Returns a dict instead of one float per completion."""
    return {"reward": 1.0}


_started = []


def slow_start_reward(completions, **columns):
    """Takes 3 s on its first call in a process (an import on first use), then is instant."""
    import time

    if not _started:
        time.sleep(3)
        _started.append(True)
    return [0.0 for _ in completions]
