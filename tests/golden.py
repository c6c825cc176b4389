"""The near-tie rule shared by the token-for-token tests.

Two correct float32 implementations may pick different tokens where the reference's top-1 and
top-2 logits are nearly equal. A comparison therefore runs up to (not including) the first step
whose reference margin is below NEAR_TIE; before it, every token must match. A flip where the
margin is larger is a bug.
"""

from __future__ import annotations

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "Water boils at a temperature of",
    "The quick brown fox",
    "In machine learning, a transformer is",
    "Translate to French: I like apples. ->",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
NEAR_TIE = 1e-3  # logits; measured float32 deviations from the reference are ~5e-5 (printed by the test)


def compare_up_to_near_tie(ours: list[int], ref: list[int], margins: list[float], tol: float = NEAR_TIE) -> int:
    """Assert agreement up to the first near-tie in the reference; return how many steps were compared."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if margins[i] < tol:
            return i
        assert a == b, f"step {i}: token {a} != reference {b} although the reference margin is {margins[i]:.4f}"
    assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"
    return len(ref)


def margins(output) -> list[float]:
    """Per generated token, the top-1 minus top-2 logprob of a RequestOutput run with logprobs >= 2."""
    out = []
    for entry in output.outputs[0].logprobs:
        top = sorted(entry.values(), reverse=True)
        out.append(top[0] - top[1] if len(top) > 1 else float("inf"))
    return out
