"""The continuous-batching engine: each row gives model.generate's tokens for it alone.

Reference: `model.generate(ids, return_result=True, **options)` for each row alone
(tokens, text and finish reason exactly, log-probs within 1e-4), and the raw
log-softmax of the model over prompt + continuation for the top alternatives.
"""

from __future__ import annotations

import threading

import pytest
import torch

import gpt2lab
from gpt2lab.errors import GPT2LabError
from gpt2lab.generation import GenerationConfig
from gpt2lab.serve.engine import Engine, EngineClosed, QueueFull, Row

TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. To die: to sleep; no more; and by a sleep to say we end the "
    "heart-ache and the thousand natural shocks that flesh is heir to."
)

# (prompt, options): prompt lengths from 1 to ~60 tokens, greedy and seeded sampling,
# penalties, stop strings and stop ids; the references below check that some rows end
# on a stop and some on their length.
CASES = [
    ("ROMEO:", dict(max_new_tokens=20)),
    ("Once upon a time there was", dict(max_new_tokens=15, temperature=0.8, seed=3)),
    (TEXT[:200], dict(max_new_tokens=25, top_k=20, seed=5, repetition_penalty=1.3)),
    ("The king said to his son,", dict(max_new_tokens=30, top_p=0.9, seed=1, stop=[","])),
    ("KING HENRY:\nWhat", dict(max_new_tokens=24, stop_token_ids=[11, 13])),
    (
        TEXT[:90],
        dict(max_new_tokens=18, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.3, seed=7),
    ),  # fmt: skip
    ("\n", dict(max_new_tokens=16, no_repeat_ngram_size=2, logit_bias={198: -5.0})),
    (
        TEXT[40:160],
        dict(max_new_tokens=22, typical_p=0.9, seed=11, min_new_tokens=5, stop=["\n\n", " the"]),
    ),  # fmt: skip
    ("I", dict(max_new_tokens=12, do_sample=True, seed=2**63 + 5, top_k=0)),
    # stop strings across tokens (" thy", " self", "."): the first cuts inside " thy"
    # (kept) and drops " self"; the second holds " self" back, then drops it with "."
    ("KING RICHARD:\nWhat", dict(max_new_tokens=30, temperature=0.7, seed=21, stop="hy sel")),
    ("KING RICHARD:\nWhat", dict(max_new_tokens=30, temperature=0.7, seed=21, stop=" self.")),
]
TOP = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Many small steps: one thread each (see conftest)."""


@pytest.fixture(scope="module")
def model():
    return gpt2lab.load("bundled")


def ids(model, text):
    return model.tokenizer.encode(text)


def row(model, prompt, options, top=TOP):
    return Row(ids(model, prompt), GenerationConfig.from_options(**options), top_logprobs=top)


@pytest.fixture(scope="module")
def references(model):
    return [alone(model, ids(model, p), o) for p, o in CASES]


def alone(model, tokens, options):
    return model.generate(tokens, return_result=True, **options)


def top_reference(model, prompt, new, k):
    """The top-k of the raw log-softmax at each generated position."""
    seq = torch.tensor([prompt + new])
    with torch.inference_mode():
        logprobs = model(seq)[0, len(prompt) - 1 : len(prompt) - 1 + len(new)].float()
    values, index = logprobs.log_softmax(-1).topk(k)
    return index.tolist(), values.tolist()


def check_job(model, job, prompts, refs, tops=None, events=None):
    """Events and results of `job` against generate's results `refs` for each row alone
    (`events`: those already read from the job)."""
    events = list(job.events(timeout=120)) if events is None else events
    results = job.results()
    assert len(results) == len(refs)
    for b, (res, ref) in enumerate(zip(results, refs, strict=True)):
        assert res.tokens == ref.tokens[0], b
        assert res.text == ref.texts[0], b
        assert res.finish_reason == ref.finish_reasons[0], b
        assert res.logprobs == pytest.approx(ref.logprobs[0], abs=1e-4), b
        mine = [e for e in events if e.row == b]
        assert [e.token for e in mine if e.token is not None] == res.tokens
        logprobs = [e.logprob for e in mine if e.token is not None]
        assert logprobs == (res.logprobs or [None] * len(res.tokens))  # beams: none
        assert "".join(e.text for e in mine) == res.text
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + [res.finish_reason]
        k = TOP if tops is None else tops[b]
        if k and res.tokens:
            want_ids, want_values = top_reference(model, prompts[b], res.tokens, k)
            got = [e.top for e in mine if e.token is not None]
            assert [[i for i, _ in t] for t in got] == want_ids
            flat = [v for t in got for _, v in t]
            assert flat == pytest.approx([v for vs in want_values for v in vs], abs=1e-4)
    return events


def test_references_cover_stops_and_lengths(references):
    reasons = [r.finish_reasons[0] for r in references]
    assert "stop" in reasons and "length" in reasons
    # a stop string cut the text (the "," case) and a stop id ended a row
    assert not references[3].texts[0].endswith(",") and references[3].finish_reasons[0] == "stop"
    assert references[4].finish_reasons[0] == "stop"
    cut_in, held = references[-2], references[-1]
    assert cut_in.texts[0].endswith(" be t") and held.texts[0].endswith(" be thy")
    assert cut_in.tokens[0] == held.tokens[0]  # " thy" kept, " self" dropped by both


@pytest.mark.parametrize("continuous", [True, False])
def test_concurrent_jobs_equal_generate_alone(model, references, continuous):
    """All rows submitted at once from several threads, fewer slots than rows (rows join
    as others leave): each equals generate alone; so does one request at a time."""
    prompts = [ids(model, p) for p, _ in CASES]
    with Engine(model, max_batch=4, continuous=continuous) as engine:
        barrier = threading.Barrier(len(CASES))
        jobs = [None] * len(CASES)

        def send(i):
            barrier.wait()
            jobs[i] = engine.submit([row(model, *CASES[i])])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(CASES))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, job in enumerate(jobs):
            check_job(model, job, [prompts[i]], [references[i]])
        total = sum(len(r.tokens[0]) + (r.finish_reasons[0] == "stop") for r in references)
        if continuous:  # rows shared steps: fewer steps than tokens
            assert engine.steps < total - len(CASES)
        else:
            assert engine.steps >= total - len(CASES) - 1


def test_one_job_of_many_rows(model, references):
    """One request of every row at once (its own rows share steps) equals each alone."""
    prompts = [ids(model, p) for p, _ in CASES]
    with Engine(model, max_batch=8) as engine:
        job = engine.submit([row(model, p, o) for p, o in CASES])
        check_job(model, job, prompts, references)


def test_n_choices_equal_a_generate_batch(model):
    """Rows seeded seed, seed + 1, ... (the server's n choices) equal generate's batch of
    the same prompt repeated, whose row b samples with seed + b; a time limit ends rows
    as generate's does."""
    prompt = ids(model, "Now is the winter of our discontent")
    opts = dict(max_new_tokens=20, temperature=0.9, top_k=40, seed=123)
    want = model.generate(torch.tensor([prompt] * 3), return_result=True, **opts)
    cfgs = [GenerationConfig.from_options(**{**opts, "seed": 123 + b}) for b in range(3)]
    timed = dict(max_new_tokens=10, max_time=1e-9)
    with Engine(model, max_batch=2) as engine:
        job = engine.submit([Row(prompt, c, top_logprobs=1) for c in cfgs])
        results = job.results(timeout=120)
        assert [r.tokens for r in results] == want.tokens
        assert [r.text for r in results] == want.texts
        assert len({tuple(t) for t in want.tokens}) == 3  # the seeds differ
        result = engine.submit([Row(prompt, GenerationConfig.from_options(**timed))]).results()
        ref = alone(model, prompt, timed)
        assert (result[0].tokens, result[0].finish_reason) == (ref.tokens[0], "time")


def test_rows_join_mid_flight(model, references):
    """Jobs submitted from other threads while a long row decodes, each after the previous
    one has produced some tokens, join the running batch."""
    long_prompt = ids(model, "HAMLET:")
    long_opts = dict(max_new_tokens=120, temperature=0.9, seed=42, stop_at_eot=False)
    prompts = [ids(model, p) for p, _ in CASES]
    with Engine(model, max_batch=8) as engine:
        first = engine.submit([Row(long_prompt, GenerationConfig.from_options(**long_opts), 2)])
        jobs, errors = {}, []

        def join_later(i):
            try:
                jobs[i] = engine.submit([row(model, *CASES[i])])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = []
        seen = []
        for event in first.events(timeout=120):
            seen.append(event)
            k = len(seen)
            if k % 4 == 0 and k // 4 <= len(CASES):
                t = threading.Thread(target=join_later, args=(k // 4 - 1,))
                t.start()
                threads.append(t)
        for t in threads:
            t.join()
        assert not errors
        ref = alone(model, long_prompt, long_opts)
        check_job(model, first, [long_prompt], [ref], tops=[2], events=seen)
        for i, job in jobs.items():
            check_job(model, job, [prompts[i]], [references[i]])
        assert len(jobs) == len(CASES)
        assert engine.rebuilds >= 2  # a longer prompt than the columns so far joined


@pytest.fixture(scope="module")
def random_model(small_ckpt):
    """transformers' random-weight GPT-2 with a context of 128 (conftest)."""
    return gpt2lab.load(str(small_ckpt))


@pytest.mark.parametrize("which", ["bundled", "random"])
def test_rebuilds_compaction_and_rows_that_must_wait(model, random_model, which):
    """The scheduler driven step by step (engine not started): a short row (A), a row
    joining at once into a free slot with masked holes before it (B), the shared columns
    running out (the cache rebuilt with only real columns: it shrinks), a prompt longer
    than the columns so far (C: rebuilt, the others right-aligned), and a row that would
    not fit beside the others within the context (D: waits until they leave). Every row
    equals generate alone."""
    m = model if which == "bundled" else random_model
    n = m.cfg.n_ctx
    specs = {
        "A": (list(range(100, 105)), dict(max_new_tokens=n // 4, top_k=50, seed=9)),
        "B": ([464, 3290, 286], dict(max_new_tokens=n // 2, repetition_penalty=1.2)),
        "C": ([(7 * i + 3) % 5000 for i in range(n // 2 + 10)], dict(max_new_tokens=n // 8)),
        "D": (
            [(11 * i + 1) % 5000 for i in range(n // 2)],
            dict(max_new_tokens=n // 2 - 1, temperature=1.2, seed=4),
        ),  # fmt: skip
    }
    for _, opts in specs.values():
        opts["stop_at_eot"] = False
    engine = Engine(m, max_batch=4)
    jobs = {}

    def submit(name):
        prompt, opts = specs[name]
        jobs[name] = engine.submit([Row(prompt, GenerationConfig.from_options(**opts), 1)])

    def tick():
        before = (engine.rebuilds, engine._cache.length if engine._cache else 0)
        with torch.inference_mode():
            engine._tick()
        after = (engine.rebuilds, engine._cache.length if engine._cache else 0)
        return before, after

    submit("A")
    for _ in range(4):
        tick()
    assert engine.rebuilds == 1  # A's first cache
    submit("B")
    tick()
    cache, slot_b = engine._cache, 1
    L = cache.length
    assert engine.rebuilds == 1 and engine.active_rows == 2  # B took a free slot
    holes = L - 1 - len(specs["B"][0])  # its prompt and first token end at column L
    assert holes > 0 and not cache.key_mask[slot_b, :holes].any()
    assert cache.key_mask[slot_b, holes:L].all()
    compacted = False
    while len(engine._rows) == 2 or not compacted:
        (r0, l0), (r1, l1) = tick()
        if r1 > r0:  # the columns ran out: rebuilt with real columns only
            assert l1 < l0 and bool(engine._cache.key_mask[: len(engine._rows), :l1].all())
            compacted = True
    assert jobs["A"].done and not jobs["B"].done
    b = engine._rows[0]
    assert b.prompt_len + b.steps - 1 < len(specs["C"][0])  # C's prompt is longer
    submit("C")
    submit("D")
    (r0, _), (r1, l1) = tick()
    assert r1 == r0 + 1 and l1 == len(specs["C"][0]) + 1  # rebuilt around C's prompt
    assert not engine._cache.key_mask[0, : l1 - b.prompt_len - b.steps].any()
    assert engine.queue_length == 1 and jobs["D"].rows and engine.active_rows == 2  # D waits
    while not all(job.done for job in jobs.values()):
        tick()
    assert engine.active_rows == 0 and engine._cache is None
    for name, job in jobs.items():
        prompt, opts = specs[name]
        check_job(m, job, [prompt], [alone(m, prompt, opts)], tops=[1])
    engine.close()


def test_cancel_frees_the_slot(model, references):
    """With one slot, a waiting job runs once the running one is cancelled; a cancelled
    job's events end (no error) and its results hold the tokens so far."""
    prompts = [ids(model, p) for p, _ in CASES]
    with Engine(model, max_batch=1) as engine:
        long_opts = dict(max_new_tokens=200, stop_at_eot=False)
        first = engine.submit(
            [Row(ids(model, "HAMLET:"), GenerationConfig.from_options(**long_opts))]
        )
        waiting = engine.submit([row(model, *CASES[0])])
        never = engine.submit([row(model, *CASES[1])])
        never.cancel()
        got = []
        for event in first.events(timeout=120):
            got.append(event.token)
            if len(got) == 3:
                first.cancel()
        assert 3 <= len(got) < 200
        result = first.results()[0]
        assert result.finish_reason == "cancelled"
        ref = alone(model, ids(model, "HAMLET:"), long_opts)
        assert result.tokens == ref.tokens[0][: len(result.tokens)]
        check_job(model, waiting, [prompts[0]], [references[0]])
        assert list(never.events(timeout=120)) == []
        assert never.cancelled and never.results()[0].finish_reason == "cancelled"
        assert engine.active_rows == 0


def test_queue_full(model, references):
    engine = Engine(model, max_batch=2, max_queue=2)  # not started: nothing leaves the queue
    jobs = [engine.submit([row(model, *CASES[i])]) for i in range(2)]
    with pytest.raises(QueueFull, match="too many requests waiting"):
        engine.submit([row(model, *CASES[2])])
    assert engine.queue_length == 2
    engine.start()
    try:
        for i, job in enumerate(jobs):
            check_job(model, job, [ids(model, CASES[i][0])], [references[i]])
        check_job(model, engine.submit([row(model, *CASES[2])]), [ids(model, CASES[2][0])],
                  [references[2]])  # fmt: skip
    finally:
        engine.close()


def failing(config, after):
    """`config` whose processors raise on call number `after` (0: the prompt's step)."""
    calls = {"n": 0}
    real = config.processors

    def processors(model, prompt_len, pad_lengths=None):
        pipeline = real(model, prompt_len, pad_lengths)

        def run(input_ids, scores):
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("boom in a processor")
            return pipeline(input_ids, scores)

        return run

    object.__setattr__(config, "processors", processors)  # frozen dataclass: tests only
    return config


@pytest.mark.parametrize("after", [0, 5])
def test_a_failing_job_leaves_the_others_fine(model, references, after):
    prompts = [ids(model, p) for p, _ in CASES]
    with Engine(model, max_batch=8) as engine:
        before = [engine.submit([row(model, *CASES[i])]) for i in range(3)]
        bad = failing(GenerationConfig.from_options(max_new_tokens=30), after)
        broken = engine.submit([Row(ids(model, "ROMEO:"), bad), row(model, *CASES[3])])
        after_jobs = [engine.submit([row(model, *CASES[i])]) for i in range(4, 7)]
        with pytest.raises(RuntimeError, match="boom"):
            list(broken.events(timeout=120))
        with pytest.raises(RuntimeError, match="boom"):
            broken.results()
        for i, job in enumerate(before + after_jobs):
            i = i if i < 3 else i + 1
            check_job(model, job, [prompts[i]], [references[i]])
        assert engine.active_rows == 0


def test_close_cancels_and_does_not_hang(model):
    engine = Engine(model, max_batch=2).start()
    opts = GenerationConfig.from_options(max_new_tokens=200, stop_at_eot=False)
    running = engine.submit([Row(ids(model, "HAMLET:"), opts)])
    queued = [engine.submit([Row(ids(model, "ROMEO:"), opts)]) for _ in range(3)]
    beams = GenerationConfig.from_options(max_new_tokens=20, num_beams=2)
    solo = engine.submit([Row(ids(model, "ROMEO:"), beams), Row(ids(model, "JULIET:"), beams)])
    next(iter(running.events(timeout=120)))  # it runs
    engine.close()
    assert all(not t.is_alive() for t in engine._threads)
    for job in [running, *queued]:
        assert job.done
        with pytest.raises(EngineClosed):
            list(job.events(timeout=120))
    assert solo.done  # its rows ran to their end or were stopped by the close
    if solo.error is not None:
        assert isinstance(solo.error, EngineClosed)
    with pytest.raises(EngineClosed):
        engine.submit([Row(ids(model, "ROMEO:"), opts)])


def test_solo_rows_beam_contrastive_and_steering(model, references):
    """Rows that cannot share a step run alone, reported through the same events, mixed in
    one request with batched rows."""
    from gpt2lab.steering import mean_difference

    vector = mean_difference(model, ["I love it"], ["I hate it"], layers=2)
    prompt = ids(model, "I think")
    beam = dict(max_new_tokens=10, num_beams=3)
    contrastive = dict(max_new_tokens=12, penalty_alpha=0.6, top_k=4)
    steer_opts = dict(max_new_tokens=14, temperature=0.7, seed=5)
    with Engine(model, max_batch=4) as engine:
        job = engine.submit([
            Row(prompt, GenerationConfig.from_options(**beam)),
            row(model, *CASES[0]),
            Row(prompt, GenerationConfig.from_options(**contrastive)),
            Row(prompt, GenerationConfig.from_options(**steer_opts), steer=(vector, 4.0)),
            Row(prompt, GenerationConfig.from_options(**steer_opts)),
        ])  # fmt: skip
        refs = [
            alone(model, prompt, beam),
            references[0],
            alone(model, prompt, contrastive),
            model.generate(prompt, return_result=True, steer=(vector, 4.0), **steer_opts),
            alone(model, prompt, steer_opts),
        ]
        refs[0].tokens, refs[0].texts = refs[0].tokens[:1], refs[0].texts[:1]
        refs[0].logprobs = [[]]
        prompts = [prompt, ids(model, CASES[0][0]), prompt, prompt, prompt]
        check_job(model, job, prompts, refs, tops=[0, TOP, 0, 0, 0])
    # steering changed the steered row only
    assert refs[3].tokens[0] != refs[4].tokens[0]


def test_bad_input_is_refused_at_submit(model):
    cfg = GenerationConfig.from_options(max_new_tokens=8)
    with Engine(model) as engine:
        for rows, match in [
            ([], "non-empty list of Row"),
            ("text", "non-empty list of Row"),
            ([("a", cfg)], "Row objects"),
            ([Row([1, 2], {"max_new_tokens": 3})], "GenerationConfig"),
            ([Row([], cfg)], "prompt"),
            ([Row([1, 50257], cfg)], "prompt"),
            ([Row([1, 2], cfg, top_logprobs=-1)], "top_logprobs"),
            ([Row([1] * 250, cfg)], "exceeds the context"),
            (
                [Row([1], GenerationConfig.from_options(num_beams=2, num_return_sequences=2))],
                "one sequence",
            ),  # fmt: skip
        ]:
            with pytest.raises(GPT2LabError, match=match):
                engine.submit(rows)
        assert engine.queue_length == 0
    idle = Engine(model)  # not started: nothing happens, and waiting says so
    with pytest.raises(TimeoutError):
        next(idle.submit([Row([1, 2], cfg)]).events(timeout=0.01))
    idle.close()
    with pytest.raises(GPT2LabError, match="max_batch"):
        Engine(model, max_batch=0)
