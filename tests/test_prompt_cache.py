"""Unit tests for the prompt-cache policy: which cached conversation a prompt continues."""

from cluster.prompt_cache import CachedSession, pick_reusable

SYSTEM = [1, 2, 3, 4]                       # template head + system prompt, shared by everyone
TURN1 = SYSTEM + [10, 11, 12]               # a first prompt
REPLY1 = [20, 21, 22]                       # its reply (the last sampled token is not in the caches)
HELD = {"a": CachedSession(TURN1 + REPLY1[:-1], len(TURN1))}


def test_next_turn_continues_its_conversation():
    turn2 = TURN1 + REPLY1 + [30, 31]
    assert pick_reusable(HELD, turn2) == ("a", len(TURN1) + 2)


def test_same_prompt_again_recomputes_only_the_last_token():
    assert pick_reusable(HELD, TURN1) == ("a", len(TURN1) - 1)


def test_next_turn_whose_reply_was_rendered_differently_keeps_the_prompt():
    turn2 = TURN1 + [99] + [30, 31]  # the template renders the earlier reply with other tokens
    assert pick_reusable(HELD, turn2) == ("a", len(TURN1))


def test_sharing_only_the_system_prompt_starts_a_new_session():
    assert pick_reusable(HELD, SYSTEM + [40, 41]) == (None, 0)


def test_edited_last_message_starts_a_new_session():
    assert pick_reusable(HELD, SYSTEM + [10, 11, 50]) == (None, 0)


def test_nothing_cached():
    assert pick_reusable({}, TURN1) == (None, 0)


def test_longest_continued_conversation_wins():
    sessions = {**HELD, "b": CachedSession(TURN1 + REPLY1 + [30, 31, 32], len(TURN1 + REPLY1) + 2),
                "c": CachedSession(SYSTEM, len(SYSTEM))}
    turn3 = TURN1 + REPLY1 + [30, 31, 32, 33]
    assert pick_reusable(sessions, turn3) == ("b", len(turn3) - 1)
    # a prompt that continues "a" but not "b" (it diverges inside b's prompt) goes to "a"
    assert pick_reusable(sessions, TURN1 + REPLY1 + [30, 77]) == ("a", len(TURN1) + 2)
