"""The continuous batch on the tiny Qwen3: greedy answers are exactly what mlx-lm gives each prompt alone, however
the sequences join, leave, or come from the prompt cache; and admission goes a bounded piece per step."""

from __future__ import annotations

import random
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import PromptProcessingBatch, generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlxpool.demo import build_tiny_chat
from mlxpool.engines import batching
from mlxpool.engines.batching import ContinuousBatch
from mlxpool.engines.kv import PromptCache
from mlxpool.engines.sampling import Sampler

GREEDY = Sampler(0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    model, tokenizer = load(str(build_tiny_chat(tmp_path_factory.mktemp("batching") / "qwen3")))[:2]
    return model, tokenizer


def alone(model: Any, prompt: list[int], n: int) -> list[int]:
    """mlx-lm's own greedy decode of one prompt: the reference."""
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    return [int(token) for token, _ in steps]


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randrange(3, 60))] for _ in range(count)]


def run(batch: ContinuousBatch, limit: int = 2000) -> dict[int, list[int]]:
    """Step until every sequence has finished; each uid's tokens."""
    out: dict[int, list[int]] = {}
    for _ in range(limit):
        if not len(batch):
            return out
        for r in batch.next()[1]:
            out.setdefault(r.uid, []).append(r.token)
    raise AssertionError("the batch did not finish")


def make_batch(model: Any, **kwargs: Any) -> ContinuousBatch:
    options = {"max_batch_size": 8, "group_size": 4, "prefill_step_size": 32} | kwargs
    return ContinuousBatch(model, stop_tokens=[], **options)


def test_answers_are_what_each_prompt_gets_alone(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    batch = make_batch(model)
    cases = prompts(11, seed=1)
    uids = [batch.insert(p, None, [], GREEDY, [], 6 + i) for i, p in enumerate(cases)]
    out = run(batch)
    for uid, prompt, n in zip(uids, cases, range(6, 17), strict=True):
        assert out[uid] == alone(model, prompt, n)


def test_newcomers_join_while_others_decode_and_leavers_do_not_disturb_them(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    batch = make_batch(model)
    first, later = prompts(5, seed=2), prompts(6, seed=3)
    uids = {batch.insert(p, None, [], GREEDY, [], 20): p for p in first}
    out: dict[int, list[int]] = {}
    gone = list(uids)[1]
    for step in range(400):
        if step == 7:
            uids |= {batch.insert(p, None, [], GREEDY, [], 12): p for p in later}
        if step == 9:
            batch.remove([gone, *[u for u in uids if u not in out][-1:]])  # one decoding, one still waiting
        for r in batch.next()[1]:
            out.setdefault(r.uid, []).append(r.token)
        if not len(batch):
            break
    removed = {gone, max(uids)}
    assert not set(out) & {max(uids)}
    for uid, prompt in uids.items():
        if uid not in removed:
            assert out[uid] == alone(model, prompt, len(out[uid])), uid
            assert len(out[uid]) == (20 if prompt in first else 12)


def test_cached_prefixes_answer_the_same_and_leave_the_cache_as_it_was(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    cache = PromptCache(max_size=4)
    base = prompts(1, seed=4)[0] + prompts(1, seed=5)[0]
    entry = make_prompt_cache(model)
    mx.eval(model(mx.array([base]), cache=entry))
    cache.insert_cache("m", base, entry)
    before = [mx.array(layer.keys) for layer in entry]
    batch = make_batch(model)
    cases = [[*base[:10], 7, 8, 9], [*base, 5, 6], base[:30], list(base)]  # longer, shorter, longer, exact
    uids = []
    for prompt in cases:
        kv, rest = cache.fetch_nearest_cache("m", prompt)
        assert kv is not None
        if not rest:  # all of it cached: read the last token again, as the chat engine does
            for layer in kv:
                layer.trim(1)
            rest = prompt[-1:]
        assert len(rest) < len(prompt)
        uids.append(batch.insert(rest, kv, prompt[: len(prompt) - len(rest)], GREEDY, [], 8))
    out = run(batch)
    for uid, prompt in zip(uids, cases, strict=True):
        assert out[uid] == alone(model, prompt, 8)
    for layer, keys in zip(entry, before, strict=True):
        assert mx.array_equal(layer.keys, keys)


def test_a_fetched_prefix_written_to_alone_leaves_the_entry_alone(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    cache = PromptCache(max_size=2)
    tokens = prompts(1, seed=6)[0]
    entry = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=entry))
    cache.insert_cache("m", tokens, entry)
    before = [(mx.array(layer.keys), layer.offset) for layer in entry]
    kv, rest = cache.fetch_nearest_cache("m", [*tokens[:-2], 1])  # a longer entry, trimmed to the shared part
    assert kv is not None and rest == [1] and all(layer.offset == len(tokens) - 2 for layer in kv)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=kv))  # as a sequence decoding alone writes to its cache
    for layer, (keys, offset) in zip(entry, before, strict=True):
        assert layer.offset == offset and mx.array_equal(layer.keys, keys)


def admission_kinds(
    model: Any, monkeypatch: pytest.MonkeyPatch, clock: Any, read: list[int] | None = None
) -> list[str]:
    """What each step did while a sequence decodes and 8 newcomers (cached prefixes and prompts to read) join."""
    read = [] if read is None else read
    prompt = PromptProcessingBatch.prompt

    def recording(self: Any, tokens: list[list[int]]) -> None:
        read.append(max(len(t) for t in tokens) * len(tokens))
        prompt(self, tokens)

    monkeypatch.setattr(PromptProcessingBatch, "prompt", recording)
    monkeypatch.setattr(batching, "ROWS_PER_PIECE", 3)
    batch = make_batch(model, max_batch_size=16, group_size=8, prefill_step_size=24, clock=clock)
    running = batch.insert([5, 6, 7], None, [], GREEDY, [], 1000)
    while not batch.running.uids:
        batch.next()
    cache, base = PromptCache(max_size=2), prompts(1, seed=7)[0]
    entry = make_prompt_cache(model)
    mx.eval(model(mx.array([base]), cache=entry))
    cache.insert_cache("m", base, entry)
    for i, p in enumerate(prompts(8, seed=7)):  # cached prefixes (a merge copies those) and rows to read
        kv, rest = cache.fetch_nearest_cache("m", base[: 5 + i] + p)
        batch.insert(rest, kv, base[: 5 + i], GREEDY, [], 5)
    kinds: list[str] = []
    while len(batch.running) < 9 or not kinds or kinds[-1] != "decode":
        merging, reading = len(batch.group.rows), len(read)
        joined, decoded = batch.next()
        kinds.append(
            "decode" if decoded else "join" if joined else "read" if len(read) > reading
            else f"merge {len(batch.group.rows) - merging}"
        )  # fmt: skip
        assert running in [r.uid for r in decoded] or not decoded
    return kinds


def test_admission_goes_a_bounded_piece_per_step(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges of at most ROWS_PER_PIECE cached prefixes and reads of at most prefill_step_size tokens, each on a
    step of its own; when each piece outlasts DECODE_GAP, pieces alternate with decode steps."""
    read: list[int] = []
    ticks = iter(range(0, 10**6))
    kinds = admission_kinds(tiny[0], monkeypatch, lambda: float(next(ticks)), read)  # a second passes per call
    assert kinds[:6] == ["decode", "merge 3", "decode", "merge 3", "decode", "merge 2"]
    assert kinds[-3:] == ["decode", "join", "decode"]
    assert kinds[::2] == ["decode"] * ((len(kinds) + 1) // 2)
    assert kinds.count("read") >= 2 and max(read) <= 24


def test_a_burst_of_newcomers_joins_in_one_go(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Within DECODE_GAP of the last decode step, pieces go back to back; the group's first tokens come next."""
    kinds = admission_kinds(tiny[0], monkeypatch, lambda: 0.0)  # no time passes
    pieces = kinds[1:-2]
    assert kinds[0] == "decode" and kinds[-2:] == ["join", "decode"]
    assert pieces[:3] == ["merge 3", "merge 3", "merge 2"] and set(pieces[3:]) == {"read"}


def test_the_host_padding_follows_the_device(tiny: tuple[Any, Any]) -> None:
    """The batch cache's host copy of each row's padding, through merges, prompts, joins and leaves."""
    model, _ = tiny
    batch = make_batch(model, max_batch_size=12, group_size=5, prefill_step_size=16)
    rng = random.Random(8)
    for step in range(300):
        if step % 25 == 0:
            for p in prompts(4, seed=step):
                batch.insert(p, None, [], GREEDY, [], rng.randrange(2, 30))
        batch.next()
        for layer in [*batch.running.prompt_cache, *(batch.group.batch.prompt_cache if batch.group.batch else [])]:
            assert layer.padding == layer.left_padding.tolist()
    assert batch.decode_steps > 100


def test_rows_without_cached_prefixes_merge_in_one_piece(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = tiny
    monkeypatch.setattr(batching, "ROWS_PER_PIECE", 3)
    batch = make_batch(model, max_batch_size=16, group_size=8)
    for p in prompts(8, seed=9):
        batch.insert(p, None, [], GREEDY, [], 5)
    batch.next()
    assert len(batch.group.rows) == 8 and not batch.waiting


def test_rows_on_one_cached_prefix_merge_as_one_and_answer_the_same(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests continuing one cached prompt share its entry's arrays: one copy merges them all (ROWS_PER_PIECE
    counts distinct prefixes), and each answers as its prompt alone."""
    model, _ = tiny
    monkeypatch.setattr(batching, "ROWS_PER_PIECE", 1)
    cache, base = PromptCache(max_size=2), prompts(1, seed=10)[0]
    entry = make_prompt_cache(model)
    mx.eval(model(mx.array([base]), cache=entry))
    cache.insert_cache("m", base, entry)
    batch = make_batch(model, max_batch_size=8, group_size=8)
    cases = [[*base, 7 + i] for i in range(5)]
    uids = []
    for prompt in cases:
        kv, rest = cache.fetch_nearest_cache("m", prompt)
        assert kv is not None and rest == prompt[-1:]
        uids.append(batch.insert(rest, kv, base, GREEDY, [], 6))
    batch.next()
    assert len(batch.group.rows) == 5 and not batch.waiting
    out = run(batch)
    for uid, prompt in zip(uids, cases, strict=True):
        assert out[uid] == alone(model, prompt, 6)


def test_a_fetched_prefix_counts_the_bytes_of_its_tokens(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    cache, tokens = PromptCache(max_size=2), prompts(1, seed=11)[0]
    entry = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=entry))
    cache.insert_cache("m", tokens, entry)
    kv, rest = cache.fetch_nearest_cache("m", [*tokens[:2], 1])
    assert kv is not None and rest == [1]
    assert sum(layer.nbytes for layer in kv) == sum(
        layer.keys[..., :2, :].nbytes + layer.values[..., :2, :].nbytes for layer in entry
    )


def test_a_group_that_joins_gets_its_first_token_before_the_next_group_is_admitted(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    batch = make_batch(model, max_batch_size=16, group_size=4, prefill_step_size=512, clock=lambda: 0.0)
    running = batch.insert([5, 6, 7], None, [], GREEDY, [], 1000)
    while not batch.running.uids:
        batch.next()
    batch.next()  # a decode step: the gap after it is open for pieces
    first = {batch.insert(p, None, [], GREEDY, [], 5) for p in prompts(4, seed=3)}
    second = {batch.insert(p, None, [], GREEDY, [], 5) for p in prompts(4, seed=4)}
    while not (joined := batch.next()[0]):
        pass
    assert set(joined) == first
    decoded = {r.uid for r in batch.next()[1]}
    assert decoded == first | {running}  # the first tokens come next, though the gap is still open
    assert {n.uid for n in batch.waiting} == second  # still waiting: no piece ran in between


def test_finished_rows_stay_until_a_quarter_of_the_batch_is_gone(tiny: tuple[Any, Any]) -> None:
    """Each removal rewrites every layer's cache, so finished rows decode on unseen until two of eight are gone;
    nobody's answer changes and no gone row's token comes out."""
    model, _ = tiny
    batch = make_batch(model, max_batch_size=8, group_size=8)
    cases = prompts(8, seed=12)
    uids = [batch.insert(p, None, [], GREEDY, [], 5 + 2 * i) for i, p in enumerate(cases)]
    out: dict[int, list[int]] = {}
    rows: list[tuple[int, int]] = []  # (live, in the batch) after each decode step
    while len(batch):
        for r in batch.next()[1]:
            out.setdefault(r.uid, []).append(r.token)
        rows.append((len(batch.running), len(batch.running.uids)))
    assert set(out) == set(uids)
    for uid, prompt, n in zip(uids, cases, range(5, 21, 2), strict=True):
        assert out[uid] == alone(model, prompt, n)
    assert (7, 8) in rows and (6, 6) in rows and (5, 6) in rows and (4, 4) in rows
    assert all(4 * (total - live) < total or live == total == 0 for live, total in rows)


def test_a_joining_group_drops_the_gone_rows_first(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    batch = make_batch(model, max_batch_size=8, group_size=8)
    cases = prompts(9, seed=13)
    first = [batch.insert(p, None, [], GREEDY, [], 4 if i == 0 else 30) for i, p in enumerate(cases[:8])]
    while len(batch.running) != 7:
        batch.next()
    assert batch.running.uids.count(batching.GONE) == 1 and first[0] not in batch.running.uids
    late = batch.insert(cases[8], None, [], GREEDY, [], 6)
    out: dict[int, list[int]] = {}
    while late not in batch.running.uids:
        for r in batch.next()[1]:
            out.setdefault(r.uid, []).append(r.token)
    assert len(batch.running.uids) == 8 and batching.GONE not in batch.running.uids
    for r in [r for _ in range(40) for r in batch.next()[1]]:
        out.setdefault(r.uid, []).append(r.token)
    assert out[late] == alone(model, cases[8], 6)


def test_a_gone_row_samples_with_the_live_rows_sampler(tiny: tuple[Any, Any]) -> None:
    """One sampler object for the whole batch is one batched sampling call; a gone row must not split it."""
    model, _ = tiny
    batch = make_batch(model, max_batch_size=8, group_size=8)
    other = Sampler(0.0)
    for i, p in enumerate(prompts(8, seed=14)):
        batch.insert(p, None, [], other if i == 0 else GREEDY, [], 3 if i == 0 else 40)
    while len(batch.running) != 7:
        batch.next()
    assert len(batch.running.uids) == 8 and all(s is GREEDY for s in batch.running.samplers)


def test_admission_pieces_and_the_decode_step_after_a_change_are_costly(tiny: tuple[Any, Any]) -> None:
    """What engines/pieces.py cuts while other models have work: the steps that read prompts or follow a change of
    the running batch, not the steady decode steps between."""
    model, _ = tiny
    batch = make_batch(model, max_batch_size=8, group_size=8)
    cases = prompts(8, seed=14)
    for i, p in enumerate(cases):
        batch.insert(p, None, [], GREEDY, [], 3 if i < 2 else 40)
    steps: list[tuple[bool, int, int]] = []  # (costly, rows that joined, live rows) per step
    while len(batch.running) != 6:
        joined, _ = batch.next()
        steps.append((batch.costly, len(joined), len(batch.running)))
    admission = steps[: next(i for i, s in enumerate(steps) if s[1]) + 1]
    assert admission and all(costly for costly, _, _ in admission)
    decodes = steps[len(admission) :]
    assert decodes[0][0] and not any(costly for costly, _, _ in decodes[1:])  # the first after the join only
    assert len(batch.running.uids) == 6  # two of eight rows finished: a quarter, so they were dropped (a change)
    batch.next()
    assert batch.costly
    batch.next()
    assert not batch.costly
