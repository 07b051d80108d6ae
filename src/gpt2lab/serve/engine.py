"""Continuous batching: many requests share each decoding step, rows join and leave freely.

The server's throughput comes from running the decode step of every live row in one
forward pass: a GPT-2 step reads all the weights whatever the batch, so eight rows cost
little more than one. Rows arrive and finish at different times, so the batch is a
set of *slots* in one KV cache that rows enter and leave between steps, each with its
own options, stop conditions and seed, and each giving exactly the tokens that
`model.generate` gives it alone:

* a joining row's prompt is prefilled alone (batch 1), so its first logits are
  generate's; its keys/values are then copied into a free slot, right-aligned so they
  end at the column every row writes next. Columns before a row's own are masked
  (`key_mask` False) and positions count real tokens only (the model's
  cumsum(key_mask) - 1), so those holes are invisible to it;
* a decode step runs the model on the live slots only (a prefix of the cache: a row
  that leaves is replaced by the last live one), then each row picks its token alone:
  its own processors on its own ids, argmax or a draw from its own torch.Generator
  seeded as generate seeds a single row, its own stop ids and stop strings;
* the columns are shared, so they run out (or a prompt longer than the columns so far
  arrives): the cache is then rebuilt with each row's real columns right-aligned. A row
  that could not finish within the context beside the live ones (aligned at the longest
  row's end, it needs its own remaining columns after it) waits until rows leave.

Events are sent once final: a token whose text might still turn out to be part of a
stop string is held back with that text, and a token the stop string cuts away is
never sent, so the events of a row add up to exactly its result. A row's last event
carries its finish reason; it has no token (None) when the row ended on a stop id.

Rows that cannot share a step (beam search, contrastive search, steering) run one at
a time on a worker thread with `generate_tokens`, reported through the same events.
The scheduler thread owns the cache; `submit`, `cancel` and the event iterators are
safe from any thread. Numbers agree with generate up to the last bits of a batched
matmul or masked softmax (logprobs to ~1e-6).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..generation.config import GenerationConfig
from ..generation.generate import _draw, _not_finite, _StopStrings, check_finite, generate_tokens
from ..validate import integer, show, token_ids

if TYPE_CHECKING:
    from ..model import GPT2, KVCache

SOLO_MODES = ("beam", "contrastive")
MIN_COLUMNS = 64  # the smallest column budget a (re)built cache gets


class QueueFull(GPT2LabError):
    """The engine's queue of waiting requests is full (the server answers 429/503)."""


class EngineClosed(GPT2LabError):
    """The engine was closed: no new requests; those in flight were cancelled."""


@dataclass(frozen=True)
class Row:
    """One sequence to continue: prompt token ids, its options, how many alternatives to
    report per token (top log-probs of the raw logits), and optional steering (what
    `model.generate(steer=...)` takes; a steered row runs outside the batch)."""

    tokens: list[int]
    config: GenerationConfig
    top_logprobs: int = 0
    steer: Any = None


@dataclass
class Event:
    """A row's progress: one new token (None on a closing event that only carries the end),
    its log-probability, the top alternatives, the text that became final with it, and
    on the row's last event its finish reason ("stop", "length" or "time")."""

    row: int
    token: int | None
    logprob: float | None
    top: list[tuple[int, float]]
    text: str
    finish_reason: str | None = None


@dataclass
class RowResult:
    """A finished row, as generate reports it: new tokens (no stop id), their log-probs and
    top alternatives, the text (cut at a stop string) and why it ended ("stop",
    "length", "time", or "cancelled")."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "cancelled"


_END = object()


class Job:
    """One request: its rows' events as they come, their results at the end."""

    def __init__(self, rows: list[Row], engine: Engine):
        self.rows = rows
        self._engine = engine
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._results = [RowResult() for _ in rows]
        self._open = len(rows)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.cancelled = False
        self.admitted = 0  # rows handed to the batch or the solo worker so far

    # ---- the caller's side -----------------------------------------------------------
    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events in order, until every row has finished (one consumer). `timeout`: the
        longest wait for the next event (TimeoutError after it). A failed job raises its
        error here; a cancelled one just ends."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event within {timeout} s") from None
            if item is _END:
                self._events.put(_END)  # a second iterator ends too
                if self.error is not None:
                    raise self.error
                return
            yield item

    def results(self, timeout: float | None = None) -> list[RowResult]:
        """Each row's result, once the job has ended (waits up to `timeout`)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self._results

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the job has ended, waiting up to `timeout` seconds for it."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop the job (the client went away): its rows leave the batch at the next step."""
        with self._lock:
            if self._done.is_set():
                return
            self.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # ---- the engine's side -----------------------------------------------------------
    def _put(self, event: Event) -> None:
        self._events.put(event)

    def _finish_row(self, index: int, result: RowResult) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._results[index] = result
            self._open -= 1
            if self._open == 0:
                self._end()

    def _keep_partial(self, index: int, result: RowResult) -> None:
        """A cancelled row's tokens so far (finish reason "cancelled")."""
        with self._lock:
            if not self._done.is_set():
                result.finish_reason = "cancelled"
                result.text = self._engine.model.tokenizer.decode(result.tokens)
                self._results[index] = result

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self._end()

    def _stop(self, error: BaseException | None = None) -> None:
        """End a cancelled job (with `error` when the engine closed under it)."""
        with self._lock:
            if self._done.is_set():
                return
            self.cancelled = True
            self.error = error
            self._end()

    def _end(self) -> None:
        self._done.set()
        self._events.put(_END)


class _Live:
    """A row being decoded: its options, generator, ids so far, text and pending events."""

    def __init__(self, model: GPT2, job: Job, index: int):
        row = job.rows[index]
        cfg = row.config
        self.job, self.index, self.top_n = job, index, row.top_logprobs
        self.prompt_len = len(row.tokens)
        self.max_new = cfg.max_new_tokens
        self.pipeline = cfg.processors(model, self.prompt_len)
        self.stop_ids = cfg.stop_ids(model)
        self.max_time = cfg.max_time
        self.gen = None
        if cfg.sample:
            seed = cfg.row_seeds(1)[0]
            self.gen = torch.Generator(device=model.device).manual_seed(seed)
        self.seq = torch.empty(1, self.prompt_len + self.max_new, dtype=torch.long,
                               device=model.device)  # fmt: skip
        self.seq[0, : self.prompt_len] = torch.tensor(row.tokens, device=model.device)
        self.steps = 0  # tokens chosen so far (a final stop id included)
        self.next: int = -1  # the chosen token not yet fed to the model
        self.text = _StopStrings(model, list(cfg.stop))
        self.result = RowResult()
        self.held: list[Event] = []  # token events whose text is still held back
        self.start = time.monotonic()

    def remaining(self) -> int:
        """How many more tokens this row may feed to the model (columns it may need)."""
        return self.max_new - self.steps


class Engine:
    """Serve generation requests from a background thread, batching rows across requests.

    `max_batch` rows share a step; `max_queue` requests may wait (then `submit` raises
    QueueFull); `continuous=False` serves one request at a time (its own rows still
    share steps). Each row's tokens equal `model.generate` for that row alone."""

    def __init__(
        self, model: GPT2, max_batch: int = 8, max_queue: int = 64, continuous: bool = True
    ):
        self.model = model
        self.max_batch = integer("max_batch", max_batch, 1)
        self.max_queue = integer("max_queue", max_queue, 0)
        self.continuous = bool(continuous)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._solo: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._threads: list[threading.Thread] = []
        # scheduler-thread state
        self._rows: list[_Live] = []
        self._cache: KVCache | None = None
        self._current: Job | None = None  # continuous=False: the job being served
        self._solo_busy = 0
        self._pool: ThreadPoolExecutor | None = None  # draws of sampled rows (see _choose_all)
        # counters for /metrics (read without the lock: monotone ints)
        self.steps = 0
        self.tokens = 0
        self.rebuilds = 0

    # ---- life cycle ------------------------------------------------------------------
    def start(self) -> Engine:
        if self._threads:
            return self
        if self._closing:
            raise EngineClosed("the engine is closed")
        for name, target in (
            ("gpt2lab-scheduler", self._schedule),
            ("gpt2lab-solo", self._solo_worker),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, cancel waiting and running ones (their event iterators raise
        EngineClosed), and join the threads (a solo row already running finishes first)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._solo.put(None)
        for thread in self._threads:
            thread.join(timeout)
        with self._cond:  # never started, or jobs left behind
            jobs = list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            job._stop(EngineClosed("the server is shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- requests --------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> Job:
        """Queue a request of one or more rows; checked here (GPT2LabError for bad input),
        QueueFull when `max_queue` requests already wait."""
        rows = self._check(rows)
        job = Job(rows, self)
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"too many requests waiting ({self.max_queue}); retry in a moment")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def _check(self, rows: Any) -> list[Row]:
        if not isinstance(rows, (list, tuple)) or not rows:
            raise GPT2LabError(f"submit takes a non-empty list of Row, got {show(rows)}")
        vocab = self.model.cfg.d_vocab
        out = []
        for row in rows:
            if not isinstance(row, Row):
                raise GPT2LabError(f"submit takes Row objects, got {show(row)}")
            if not isinstance(row.config, GenerationConfig):
                raise GPT2LabError(
                    f"a Row's config must be a GenerationConfig, got {type(row.config).__name__}"
                )
            tokens = token_ids("prompt", row.tokens, vocab)
            top = integer("top_logprobs", row.top_logprobs, 0, vocab)
            row.config.check(self.model, len(tokens))
            if row.config.num_return_sequences not in (None, 1):
                raise GPT2LabError(
                    "a Row gives one sequence: for several beams' results submit one Row "
                    "each, not num_return_sequences"
                )
            out.append(Row(tokens, row.config, top, row.steer))
        return out

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self._rows) + self._solo_busy

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the scheduler thread ----------------------------------------------------------
    def _schedule(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closing or self._rows or self._admissible()):
                        self._cond.wait()
                    if self._closing:
                        break
                self._tick()
        error = EngineClosed("the server is shutting down")
        for live in self._rows:
            live.job._stop(error)
        self._rows, self._cache = [], None

    def _tick(self) -> None:
        """One round: admit what may join, drop cancelled rows, one decode step."""
        with self._cond:
            admit = self._take()
        try:
            for job, index in admit:
                self._admit(job, index)
            self._drop_cancelled()
            if self._rows:
                self._step()
        except Exception as error:  # noqa: BLE001 - never let the scheduler die
            for job in {id(r.job): r.job for r in self._rows}.values():
                job._fail(error)
            self._rows, self._cache = [], None

    def _admissible(self) -> bool:
        """Whether a waiting row could join now (called under the lock)."""
        self._prune_waiting()
        if not self._waiting or len(self._rows) >= self.max_batch:
            return False
        return self.continuous or self._current in (None, self._waiting[0])

    def _prune_waiting(self) -> None:
        for job in [j for j in self._waiting if j.cancelled or j.done]:
            self._waiting.remove(job)
            job._stop()
        if self._current is not None and self._current.done:
            self._current = None

    def _take(self) -> list[tuple[Job, int]]:
        """Rows to admit now, first come first served, within the free slots (under the lock).
        Solo rows go straight to the solo worker and take no slot."""
        out: list[tuple[Job, int]] = []
        free = self.max_batch - len(self._rows)
        # (columns a row holds now, columns it may still add) for the live and new rows
        spans = [(r.prompt_len + r.steps - 1, r.remaining()) for r in self._rows]
        while self._waiting and self._admissible():
            job = self._waiting[0]
            if not self.continuous:
                self._current = job
            while job.admitted < len(job.rows) and free > 0:
                index = job.admitted
                row = job.rows[index]
                solo = _is_solo(row)
                span = (len(row.tokens), row.config.max_new_tokens - 1)
                if not solo and not self._fits(spans + [span]):
                    break  # it waits (at the head) until rows leave
                job.admitted += 1
                if solo:
                    self._solo_busy += 1
                    self._solo.put((job, index))
                else:
                    out.append((job, index))
                    spans.append(span)
                    free -= 1
            if job.admitted < len(job.rows):
                break
            self._waiting.popleft()
            if free <= 0:
                break
        return out

    def _fits(self, spans: list[tuple[int, int]]) -> bool:
        """Whether rows sharing the columns can all finish within the context: aligned at
        the longest one's end, each needs its remaining columns after it. A row that would
        break this (a long prompt beside a long continuation) waits rather than force a
        rebuild of the cache at every step; alone, every row fits (config.check)."""
        width = max(held for held, _ in spans)
        return len(spans) == 1 or width + max(more for _, more in spans) <= self.model.cfg.n_ctx

    def _admit(self, job: Job, index: int) -> None:
        """Prefill a row alone, pick its first token, and give it a slot if it goes on."""
        if job.done:
            return
        try:
            live = _Live(self.model, job, index)
            tokens = live.seq[:, : live.prompt_len]
            own = self.model.new_cache(1, live.prompt_len)
            logits = self.model(tokens, cache=own, logits_to_keep=1)[:, -1]
            check_finite(logits)
            if self._advance(live, logits.float()):
                return
            self._place(live, own)
        except Exception as error:  # noqa: BLE001 - the job fails, the scheduler goes on
            job._fail(error)
            self._remove(lambda r: r.job is job)

    def _step(self) -> None:
        """One decode step for every live row."""
        try:
            if self._cache.length >= self._cache.max_len:
                self._rebuild()
            n = len(self._rows)
            view = _prefix(self._cache, n)
            fed = torch.tensor([[r.next] for r in self._rows], device=self.model.device)
            logits = self.model(fed, cache=view)[:, -1].float()
            self._cache.length = view.length
            self.steps += 1
        except Exception as error:  # noqa: BLE001 - a shared step failed: every row's job fails
            for live in self._rows:
                live.job._fail(error)
            self._rows, self._cache = [], None
            return
        finished = set()
        rows = [(live, logits[i : i + 1]) for i, live in enumerate(self._rows)]
        for (live, _), pick in zip(rows, self._choose_all(rows), strict=True):
            if live.job.done:
                finished.add(id(live))
                continue
            try:
                if isinstance(pick, Exception):
                    raise pick
                if self._record(live, *pick):
                    finished.add(id(live))
            except Exception as error:  # noqa: BLE001 - this row's job fails alone
                live.job._fail(error)
                finished.add(id(live))
        self._remove(lambda r: id(r) in finished or r.job.done)

    def _choose_all(self, rows: list[tuple[_Live, torch.Tensor]]) -> list:
        """Each row's (token, log-probs) or its exception. A sampled row's draw is serial
        work (torch.multinomial fills a vocabulary of exponentials from the row's own
        generator, about 1 ms): with several sampled rows the draws are spread over two
        threads (torch releases the GIL; each row has its own generator, so the tokens
        are the same whichever thread draws them)."""

        def choose(item):
            try:
                return self._choose(*item)
            except Exception as error:  # noqa: BLE001 - reported per row by the caller
                return error

        sampled = sum(live.gen is not None for live, _ in rows)
        if sampled < 2:
            return [choose(item) for item in rows]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="gpt2lab-draw")
        return list(self._pool.map(choose, rows))

    def _drop_cancelled(self) -> None:
        cancelled = {id(r.job) for r in self._rows if r.job.cancelled}
        for live in self._rows:
            if id(live.job) in cancelled:
                live.job._keep_partial(live.index, live.result)
                live.job._stop()
        self._remove(lambda r: id(r.job) in cancelled or r.job.done)

    # ---- one row's token ---------------------------------------------------------------
    def _advance(self, live: _Live, logits: torch.Tensor) -> bool:
        """Choose `live`'s next token from its logits [1, vocab] (float32), report it; True
        when the row has finished."""
        return self._record(live, *self._choose(live, logits))

    def _choose(self, live: _Live, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """`live`'s next token and the raw log-probs [1, vocab] it was chosen from; touches
        nothing shared (runs on a draw thread)."""
        logprobs = torch.log_softmax(logits, dim=-1)
        width = live.prompt_len + live.steps
        scores = live.pipeline(live.seq[:, :width], logits)
        if live.gen is not None:
            token = _draw(torch.softmax(scores, dim=-1), [live.gen])
        else:
            token = scores.argmax(-1)
        return int(token), logprobs

    def _record(self, live: _Live, t: int, logprobs: torch.Tensor) -> bool:
        """Append token `t` to `live`, send what is final; True when the row has finished."""
        width = live.prompt_len + live.steps
        lp = float(logprobs[0, t])
        if lp != lp:  # NaN: the logits went non-finite after the prompt
            raise _not_finite()
        live.seq[0, width] = t
        live.steps += 1
        live.next = t
        self.tokens += 1
        if t in live.stop_ids:
            return self._finish(live, "stop", "")
        top: list[tuple[int, float]] = []
        if live.top_n:
            values, ids = logprobs[0].topk(live.top_n)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        res = live.result
        res.tokens.append(t)
        res.logprobs.append(lp)
        res.top.append(top)
        live.held.append(Event(live.index, t, lp, top, ""))
        piece = live.text.push(t)
        if live.text.stopped:
            return self._finish(live, "stop", piece)
        if live.steps >= live.max_new:
            return self._finish(live, "length", piece)
        if live.max_time is not None and time.monotonic() - live.start > live.max_time:
            return self._finish(live, "time", piece)
        if piece:
            self._release(live, len(live.held), piece, None)
        return False

    def _finish(self, live: _Live, reason: str, piece: str) -> bool:
        res = live.result
        if live.text.stopped:  # keep only the tokens whose text lies before the stop string
            first_held = len(res.tokens) - len(live.held)
            decode = self.model.tokenizer.decode
            while res.tokens and len(decode(res.tokens[:-1])) >= len(live.text.text):
                res.tokens.pop(), res.logprobs.pop(), res.top.pop()
            res.text = live.text.text
            kept = max(0, len(res.tokens) - first_held)
        else:
            piece += live.text.finish()
            res.text = self.model.tokenizer.decode(res.tokens)
            kept = len(live.held)
        res.finish_reason = reason
        self._release(live, kept, piece, reason)
        live.job._finish_row(live.index, res)
        return True

    @staticmethod
    def _release(live: _Live, kept: int, text: str, reason: str | None) -> None:
        """Send the first `kept` held events (the rest were cut by a stop string), `text` and
        `reason` on the last; a closing event without a token when none is left."""
        events = live.held[:kept]
        live.held = []
        if reason is not None and not events:
            events = [Event(live.index, None, None, [], "")]
        if events:
            events[-1].text = text
            events[-1].finish_reason = reason
        for event in events:
            live.job._put(event)

    # ---- the cache's slots ---------------------------------------------------------------
    def _place(self, live: _Live, own: KVCache) -> None:
        """Put a prefilled row into the next free slot, ending at the shared column."""
        cache, n, P = self._cache, len(self._rows), live.prompt_len
        if cache is None or n >= cache.batch or P > cache.length:
            self._rebuild(live, own)
            return
        L = cache.length
        cache.k[:, n, :, L - P : L] = own.k[:, 0, :, :P]
        cache.v[:, n, :, L - P : L] = own.v[:, 0, :, :P]
        cache.k[:, n, :, : L - P] = 0  # holes: masked, but must be finite (0 x NaN is NaN)
        cache.v[:, n, :, : L - P] = 0
        cache.key_mask[n, : L - P] = False
        cache.key_mask[n, L - P : L] = True
        self._rows.append(live)

    def _rebuild(self, joining: _Live | None = None, own: KVCache | None = None) -> None:
        """A new cache with every live row's real columns right-aligned (and `joining`'s
        prompt from `own`), with room for the rows and columns they may need."""
        old, rows = self._cache, list(self._rows)
        L = old.length if old is not None else 0
        lengths = old.key_mask[: len(rows), :L].sum(1).tolist() if rows else []
        sources = [(old, i, length) for i, length in enumerate(lengths)]
        if joining is not None:
            rows.append(joining)
            sources.append((own, 0, joining.prompt_len))
        width = max(length for _, _, length in sources)
        need = width + max(r.remaining() for r in rows)
        n_ctx = self.model.cfg.n_ctx
        columns = min(n_ctx, max(need, 2 * width, MIN_COLUMNS))
        batch = min(self.max_batch, max(len(rows), 2 * (old.batch if old is not None else 1)))
        new = self.model.new_cache(batch, columns)
        new.has_padding = True
        new.key_mask[:] = False
        for j, (src, i, length) in enumerate(sources):
            if src is own:
                k, v = src.k[:, i, :, :length], src.v[:, i, :, :length]
            else:
                real = src.key_mask[i, :L].nonzero().squeeze(1)
                k, v = src.k[:, i].index_select(2, real), src.v[:, i].index_select(2, real)
            new.k[:, j, :, : width - length] = 0  # holes: masked, but must be finite
            new.v[:, j, :, : width - length] = 0
            new.k[:, j, :, width - length : width] = k
            new.v[:, j, :, width - length : width] = v
            new.key_mask[j, width - length : width] = True
        new.length = width
        self._cache, self._rows = new, rows
        self.rebuilds += 1

    def _remove(self, leaving: Callable[[_Live], bool]) -> None:
        """Take rows out of the batch; the last live row moves into each freed slot."""
        cache = self._cache
        for slot in reversed(range(len(self._rows))):
            if not leaving(self._rows[slot]):
                continue
            last = len(self._rows) - 1
            if slot != last and cache is not None:
                L = cache.length
                cache.k[:, slot, :, :L] = cache.k[:, last, :, :L]
                cache.v[:, slot, :, :L] = cache.v[:, last, :, :L]
                cache.key_mask[slot, :L] = cache.key_mask[last, :L]
                self._rows[slot] = self._rows[last]
            self._rows.pop()
        if not self._rows:
            self._cache = None  # free the memory while idle

    # ---- rows outside the batch ----------------------------------------------------------
    def _solo_worker(self) -> None:
        with torch.inference_mode():
            while True:
                item = self._solo.get()
                if item is None:
                    return
                job, index = item
                try:
                    if job.cancelled:
                        job._stop()
                    elif self._closing:
                        job._stop(EngineClosed("the server is shutting down"))
                    elif not job.done:
                        self._run_solo(job, index)
                except Exception as error:  # noqa: BLE001 - the job fails, the worker goes on
                    job._fail(error)
                finally:
                    with self._cond:
                        self._solo_busy -= 1
                        self._cond.notify_all()

    def _run_solo(self, job: Job, index: int) -> None:
        """Beam / contrastive / steered row: generate_tokens alone, then its events."""
        from ..steering.apply import steered

        row = job.rows[index]
        tokens = torch.tensor([row.tokens], device=self.model.device)
        with steered(self.model, row.steer):
            result = generate_tokens(self.model, tokens, None, row.config)
        res = RowResult(
            tokens=list(result.tokens[0]),
            logprobs=list(result.logprobs[0]),
            top=[[] for _ in result.tokens[0]],
            text=result.texts[0],
            finish_reason=result.finish_reasons[0],
        )
        decoder = self.model.tokenizer.stream_decoder()
        sent, text = 0, ""
        events = []
        for k, t in enumerate(res.tokens):
            text += decoder.push(t)
            upto = min(len(text), len(res.text))
            lp = res.logprobs[k] if k < len(res.logprobs) else None
            events.append(Event(index, t, lp, [], res.text[sent:upto]))
            sent = max(sent, upto)
        if not events:
            events.append(Event(index, None, None, [], ""))
        events[-1].text += res.text[sent:]
        events[-1].finish_reason = res.finish_reason
        for event in events:
            job._put(event)
        self.tokens += len(res.tokens)
        job._finish_row(index, res)


def _is_solo(row: Row) -> bool:
    return row.steer is not None or row.config.mode in SOLO_MODES


def _prefix(cache: KVCache, n: int) -> KVCache:
    """A KVCache over the first `n` slots of `cache` (views: what a step writes lands in
    `cache`), so free slots cost nothing."""
    from ..model import KVCache

    if n == cache.batch:
        return cache
    view = KVCache.__new__(KVCache)
    view.k, view.v, view.key_mask = cache.k[:, :n], cache.v[:, :n], cache.key_mask[:n]
    view.has_padding, view.length, view.prompt_end = True, cache.length, cache.prompt_end
    return view
