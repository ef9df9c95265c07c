"""Which cached conversation a new prompt may continue: pure logic, no networking.

The nodes keep a finished request's KV caches (its session) so that the conversation's next
turn prefills only what is new. A prompt continues a cached session only when it extends that
session's whole prompt: a next turn, or the same prompt again. Sharing just a head (the same
system prompt, the template's first tokens) is not enough, because continuing trims the
session to the shared part, and another conversation's history would be gone for its next turn.
"""

from dataclasses import dataclass

from mlx_lm.utils import common_prefix_len


@dataclass
class CachedSession:
    tokens: list       # what the nodes' caches hold, position by position
    prompt_len: int    # how many of those were the prompt of the request that left them


def pick_reusable(sessions: dict, prompt: list) -> tuple:
    """(session id, positions to keep) of the cached session `prompt` continues, or (None, 0).

    Among the sessions whose prompt `prompt` extends, the one sharing the most positions. At
    least the last prompt token is computed again, as mlx-lm's generate samples from it."""
    best, best_len = None, 0
    for session_id, cached in sessions.items():
        n = common_prefix_len(cached.tokens, prompt)
        if n >= cached.prompt_len and n > best_len:
            best, best_len = session_id, n
    return best, min(best_len, len(prompt) - 1)
