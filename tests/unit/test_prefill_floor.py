"""bench/prefill_floor.py: the fewest tokens any router can have the engines prefill (its docstring
gives the rule it follows, vLLM's ``get_computed_blocks``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from prefill_floor import floor_tokens


def test_a_shared_prefix_is_prefilled_once_in_whole_blocks() -> None:
    a = list(range(10))
    # a: nothing cached (10); a + 2: 8 of its 12 cached (two full blocks of 4); a again: a full hit
    # still computes its last token, so 9 tokens cut to 8 are cached and 2 prefilled
    assert floor_tokens([a, [*a, 10, 11], a], block=4) == 10 + 4 + 2


def test_unrelated_prompts_share_nothing_and_order_within_a_session_counts() -> None:
    a, b = list(range(8)), list(range(100, 108))
    assert floor_tokens([a, b], block=4) == 16
    history = list(range(200, 212))
    turn2 = [*history, 300, 301, 302, 303]
    # the second turn reuses the first turn's 12 tokens (three blocks); sent first, it would not
    assert floor_tokens([history, turn2], block=4) == 12 + 4
    assert floor_tokens([turn2, history], block=4) == 16 + 4  # history: 11 of 12 usable, cut to 8


def test_the_longest_earlier_prompt_wins() -> None:
    base = list(range(16))
    short, long_ = base[:4] + [900] * 4, base[:12] + [901] * 4
    assert floor_tokens([short, long_, base], block=4) == 8 + 12 + 4
