"""One model, many threads: hooks and kernel choices belong to the call that made them.

Each job (plain and hooked greedy generation, run_with_cache, run_with_hooks, seeded
bf16 sampling, contrastive search) is first run alone for its reference output; then
four threads run a shuffled mix of the same jobs on the same two models at once, and
every output must equal its reference. Before hooks were scoped to the call, a
hooked generate in one thread changed every plain generate of another, and
run_with_cache recorded the other thread's activations.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

import gpt2lab as gl
from gpt2lab.errors import GPT2LabError

PROMPTS = ["The meaning of life is", "Once upon a time", "In the beginning God created"]
STEER = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def models():
    return gl.load(), gl.load(dtype="bfloat16")


DIRECTION = torch.randn(256, generator=torch.Generator().manual_seed(0))  # bundled d_model


def steer(x, hook):
    return x + 4 * DIRECTION.to(x.dtype)  # large enough to change every greedy continuation


def knock_out(x, hook):
    return torch.zeros_like(x)


def jobs(fp32, bf16) -> dict:
    """name -> a function of no arguments returning something comparable."""

    def plain(i):
        return lambda: fp32.generate(PROMPTS[i], max_new_tokens=8)

    def hooked(i):
        def run():
            with fp32.hooks([(STEER, steer)]):
                return fp32.generate(PROMPTS[i], max_new_tokens=8)

        return run

    def cached(i):
        def run():
            logits, cache = fp32.run_with_cache(
                PROMPTS[i], names_filter=lambda n: n.endswith(("hook_resid_post", "hook_pattern"))
            )
            return [logits] + [cache[k] for k in sorted(cache)]

        return run

    def ablated(i):
        return lambda: fp32.run_with_hooks(
            PROMPTS[i], fwd_hooks=[("blocks.1.hook_mlp_out", knock_out)]
        )

    def sampled(i):
        return lambda: bf16.generate(PROMPTS[i], max_new_tokens=8, temperature=1.0, seed=i)

    def sampled_hooked(i):
        def run():
            with bf16.hooks([(STEER, steer)]):
                return bf16.generate(PROMPTS[i], max_new_tokens=8, top_k=20, seed=10 + i)

        return run

    def contrastive(i):
        return lambda: fp32.generate(PROMPTS[i], max_new_tokens=6, penalty_alpha=0.6, top_k=4)

    makers = [plain, hooked, cached, ablated, sampled, sampled_hooked, contrastive]
    return {f"{m.__name__}{i}": m(i) for m in makers for i in range(len(PROMPTS))}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def run_threads(fns: dict, n_threads: int, rounds: int) -> list[str]:
    """Run every job `rounds` times, shuffled over `n_threads` threads; return the
    names of outputs that differ from the job's single-threaded reference."""
    refs = {name: fn() for name, fn in fns.items()}
    work = [name for name in fns for _ in range(rounds)]
    random.Random(0).shuffle(work)
    lanes = [work[i::n_threads] for i in range(n_threads)]
    wrong: list[str] = []
    errors: list[BaseException] = []

    def lane(names):
        try:
            for name in names:
                if not same(fns[name](), refs[name]):
                    wrong.append(name)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=lane, args=(names,)) for names in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return wrong


def test_hooks_differ_from_plain_runs(models):
    # The test below is only meaningful if hooked jobs change their outputs.
    fns = jobs(*models)
    for i in range(len(PROMPTS)):
        assert fns[f"plain{i}"]() != fns[f"hooked{i}"]()
        assert not same(fns[f"ablated{i}"](), models[0](PROMPTS[i]))


def test_threads_see_only_their_own_hooks(models, one_thread):
    wrong = run_threads(jobs(*models), n_threads=4, rounds=3)
    assert wrong == []


@pytest.mark.slow
def test_threads_see_only_their_own_hooks_long(models):
    # The acceptance run: four threads for well over 20 s on this machine.
    wrong = run_threads(jobs(*models), n_threads=4, rounds=25)
    assert wrong == []


def test_bf16_decoding_flips_no_process_wide_switch(models):
    # Another thread polls torch's oneDNN switch while bf16 decoding runs.
    _, bf16 = models
    seen: set[bool] = set()
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            seen.add(torch.backends.mkldnn.enabled)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        bf16.generate(PROMPTS[0], max_new_tokens=6)
    finally:
        stop.set()
        poller.join()
    assert seen == {torch.backends.mkldnn.enabled}


def test_threads_started_inside_a_hook_block_run_without_its_hooks(models):
    fp32, _ = models
    ref = fp32.generate(PROMPTS[0], max_new_tokens=8)
    out = []
    with fp32.hooks([(STEER, steer)]):
        t = threading.Thread(target=lambda: out.append(fp32.generate(PROMPTS[0], max_new_tokens=8)))
        t.start()
        t.join()
        inside = fp32.generate(PROMPTS[0], max_new_tokens=8)
    assert out == [ref] and inside != ref


def test_asyncio_tasks_have_their_own_hooks(models):
    fp32, _ = models
    x = fp32.to_tokens(PROMPTS[1])
    with torch.no_grad():
        plain = fp32(x)

    async def hooked(started: asyncio.Event, done: asyncio.Event):
        with fp32.hooks([("blocks.1.hook_mlp_out", knock_out)]):
            started.set()
            await done.wait()  # the other task runs while this block is open
            return fp32(x)

    async def unhooked(started: asyncio.Event, done: asyncio.Event):
        await started.wait()
        out = fp32(x)
        done.set()
        return out

    async def main():
        started, done = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(hooked(started, done), unhooked(started, done))

    with torch.no_grad():
        a, b = asyncio.run(main())
    assert torch.equal(b, plain) and not torch.equal(a, plain)


def test_persistent_hooks_and_reset(models):
    fp32, _ = models
    x = fp32.to_tokens(PROMPTS[2])
    with torch.no_grad():
        plain = fp32(x)
        fp32.add_hook("blocks.1.hook_mlp_out", knock_out)
        try:
            ablated = fp32(x)  # a persistent hook is the model's: every caller sees it
            seen = []

            def other_thread():
                with torch.no_grad():  # (grad mode is per thread)
                    seen.append(fp32(x))

            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            assert torch.equal(seen[0], ablated) and not torch.equal(ablated, plain)
        finally:
            fp32.reset_hooks()
        assert torch.equal(fp32(x), plain)
        # reset_hooks() inside a block removes its hooks too, and the block still exits
        # cleanly (inside a block the forward takes the hooked path: compare with one)
        with fp32.hooks():
            hooked_plain = fp32(x)
        with fp32.hooks([(STEER, steer)]):
            fp32.reset_hooks()
            assert torch.equal(fp32(x), hooked_plain)
        assert not any(hp.fns for hp in fp32.hook_dict.values())
        # nested blocks: the inner one's exit restores the outer one's hooks
        with fp32.hooks([("blocks.1.hook_mlp_out", knock_out)]):
            with fp32.hooks([(STEER, steer)]):
                pass
            assert torch.equal(fp32(x), ablated)
        assert torch.equal(fp32(x), plain)


@pytest.mark.parametrize(
    "returned",
    [
        lambda x: 1.5,
        lambda x: [1.0],
        lambda x: "x",
        lambda x: x.long(),
        lambda x: x > 0,
        lambda x: x.to(torch.complex64),
        lambda x: x[..., :-1],
        lambda x: x.unsqueeze(0),
        lambda x: x.numpy(),
    ],
    ids=["float", "list", "str", "int64", "bool", "complex", "shorter", "extra-axis", "numpy"],
)
def test_hooks_returning_the_wrong_thing_are_named(models, returned):
    fp32, _ = models

    def bad_hook(x, hook):
        return returned(x)

    with pytest.raises(GPT2LabError, match=r"hook bad_hook on blocks\.1\.hook_resid_mid"):
        with torch.no_grad():
            fp32.run_with_hooks(PROMPTS[0], fwd_hooks=[("blocks.1.hook_resid_mid", bad_hook)])
    assert not any(hp.fns for hp in fp32.hook_dict.values())


@pytest.mark.parametrize(
    "hooks, message",
    [
        ([("blocks.0.hook_resid_pr", knock_out)], "did you mean 'blocks.0.hook_resid_pre'"),
        ([("blocks.99.hook_resid_pre", knock_out)], "no hook point named"),
        ([(3, knock_out)], "by name or by a predicate"),
        ([("hook_embed", "not a function")], r"\(name, function\) pairs"),
        ([("hook_embed",)], r"\(name, function\) pairs"),
        ("hook_embed", r"\(name, function\) pairs"),
        (5, r"\(name, function\) pairs"),
    ],
)
def test_bad_hook_lists_are_errors_before_anything_runs(models, hooks, message):
    fp32, _ = models
    with pytest.raises(GPT2LabError, match=message):
        with fp32.hooks(hooks):
            pass
    assert not any(hp.fns for hp in fp32.hook_dict.values())


@pytest.mark.parametrize(
    "names_filter, message",
    [
        ("blocks.0.hook_resid_pr", "did you mean 'blocks.0.hook_resid_pre'"),
        (["hook_embed", "blocks.0.attn.hook_patern"], "did you mean 'blocks.0.attn.hook_pattern'"),
        (lambda n: n.endswith("hook_nothing"), "matches no hook point"),
    ],
)
def test_names_filter_typos_are_errors(models, names_filter, message):
    fp32, _ = models
    with pytest.raises(GPT2LabError, match=message):
        fp32.run_with_cache(PROMPTS[0], names_filter=names_filter)


def test_remove_batch_dim_needs_a_batch_of_one(models):
    fp32, _ = models
    with pytest.raises(GPT2LabError, match="batch of one, got 2"):
        fp32.run_with_cache(PROMPTS[:2], remove_batch_dim=True, names_filter="hook_embed")
    _, cache = fp32.run_with_cache(PROMPTS[0], remove_batch_dim=True, names_filter="hook_embed")
    _, full = fp32.run_with_cache(PROMPTS[0], names_filter="hook_embed")
    assert torch.equal(cache["hook_embed"], full["hook_embed"][0])


def test_other_float_dtypes_are_cast_back_except_under_autocast(models):
    fp32, _ = models
    x = fp32.to_tokens(PROMPTS[0])
    direction = DIRECTION.double()
    with torch.no_grad():
        ref = fp32.run_with_hooks(x, fwd_hooks=[(STEER, lambda a, h: a + direction.float())])
        got = fp32.run_with_hooks(x, fwd_hooks=[(STEER, lambda a, h: a.double() + direction)])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # under autocast activations are bf16 and fp32 ones are normal: left as they are
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = fp32.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_z", lambda a, h: a.float())])
        assert torch.isfinite(z).all()


def test_blocks_inside_interleaved_generators_keep_to_themselves(models):
    # Two generators, each holding a hooks() block across its yields, stepped in turn
    # in one thread. Stepped in a context of their own each (as `stream` runs), every
    # step sees its own block's hooks only; stepped in the caller's context, a step sees
    # every block open in it (Python shares one context between a thread's generators),
    # but a block ending never takes another's hooks with it. None survive.
    import contextvars

    fp32, _ = models
    seen: list[str] = []

    def steps(label):
        with fp32.hooks([("hook_embed", lambda x, h: seen.append(label))]):
            for _ in range(2):
                fp32(fp32.to_tokens("a"))
                seen.append("|")
                yield

    a, b = steps("A"), steps("B")
    ctx_a, ctx_b = contextvars.copy_context(), contextvars.copy_context()
    for gen, ctx in [(a, ctx_a), (b, ctx_b)] * 3:
        ctx.run(next, gen, None)
    assert "".join(seen) == "A|B|A|B|"
    seen.clear()
    a, b = steps("A"), steps("B")
    for gen in (a, b, a, b, a, b):
        next(gen, None)
    assert "".join(seen) == "A|AB|AB|AB|"
    seen.clear()
    fp32(fp32.to_tokens("a"))
    assert seen == [] and not any(hp.fns for hp in fp32.hook_dict.values())


def test_a_block_ended_in_another_thread_leaves_no_hooks_behind(models):
    # A generator opened its block in one thread and was finished in another: the
    # first thread must not keep running the finished block's hooks.
    fp32, _ = models
    seen: list[int] = []

    def steps():
        with fp32.hooks([("hook_embed", lambda x, h: seen.append(1))]):
            yield
            yield

    gen = steps()
    ran_in_first: list[bool] = []
    first = threading.Thread(target=lambda: next(gen))
    first.start()
    first.join()
    last = threading.Thread(target=lambda: (next(gen), next(gen, None)))
    last.start()
    last.join()

    def later_in_first_thread():  # a fresh thread stands in for a reused pool thread
        fp32(fp32.to_tokens("a"))
        ran_in_first.append(bool(seen))

    with torch.no_grad():
        t = threading.Thread(target=later_in_first_thread)
        t.start()
        t.join()
    assert ran_in_first == [False]


def test_stream_steps_keep_the_hooks_of_where_the_stream_was_made(models):
    # A stream made inside a hooks() block and advanced on other threads, interleaved
    # with a stream made outside it, runs every step with that block's hooks (while it
    # is open), and the other one with none: each equals generate() under its hooks.
    fp32, _ = models
    steered_ref = jobs(*models)["hooked0"]()
    plain_ref = fp32.generate(PROMPTS[0], max_new_tokens=8)
    got: dict[str, list[str]] = {"steered": [], "plain": []}

    def advance(name, it, done):
        piece = next(it, None)
        if piece is None:
            done.append(name)
        else:
            got[name].append(piece)

    plain = fp32.stream(PROMPTS[0], max_new_tokens=8)
    with fp32.hooks([(STEER, steer)]):
        steered = fp32.stream(PROMPTS[0], max_new_tokens=8)
        alive = {"steered": steered, "plain": plain}
        while alive:
            done: list[str] = []
            for name, it in alive.items():
                t = threading.Thread(target=advance, args=(name, it, done))
                t.start()
                t.join()
            for name in done:
                del alive[name]
    assert "".join(got["steered"]) == steered_ref
    assert "".join(got["plain"]) == plain_ref != steered_ref
    # made in a block that has ended: the block's hooks are gone
    with fp32.hooks([(STEER, steer)]):
        late = fp32.stream(PROMPTS[0], max_new_tokens=8)
    assert "".join(late) == plain_ref


def test_stream_checks_its_arguments_when_called(models):
    fp32, _ = models
    with pytest.raises(GPT2LabError, match="max_new_tokens"):
        fp32.stream(PROMPTS[0], max_new_tokens=-1)  # before any piece is asked for
