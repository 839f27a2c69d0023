"""``refusal-guard collect``: run the self-prediction protocol over a prompt set, offline.

For every prompt x repeat: the introspection probe (the proxy's own :class:`~guard.probe.prober.Prober`,
so the same template, body builder, dialect fallback and parser), then the same request in a fresh
context (a plain chat completion with only the user prompt), then the refusal detector on the answer.
Each finished item becomes one datapoint in the proxy's schema (:data:`calibration.datapoints.FIELDS`,
``mode="collect"``), appended to a JSONL file and flushed at once, so ``refusal-guard calibrate``
reads collected files and the proxy's log alike, and a crash loses at most the items in flight.

Resuming: each record's ``request_id`` is ``collect-<item key>-<repeat>``, the item key being a hash
of the prompt's id and text. A re-run with the same ``--out`` reads the file back and skips every
(prompt, repeat) already there for the same model and probe template.

An item is *finished* (written) once the generation produced an answer and the probe either gave a
prediction or an answer that does not parse (``probe_status`` ``unparseable``: the model's own
behaviour, recorded like the proxy records it). An item whose probe or generation failed at the
transport level (after retries), or timed out, is not written: it is counted as failed and tried again
by the next run.

Retries: 429, 5xx and transport errors (connection refused or reset, broken responses) are retried
with exponential backoff and full jitter, honouring ``Retry-After``, up to ``--max-attempts`` attempts
per call. Timeouts are not retried within a run (the budget was spent; a slow model would be slow
again), and 401/403/404 stop the run at once (wrong key, model or URL fail every item the same way).
After ``--max-consecutive-failures`` failed items in a row the run stops too (the endpoint is down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from calibration.datapoints import FIELDS
from guard.apis.chat import CHAT
from guard.truth.detector import RefusalDetector, is_refusal
from guard.live.metrics import GuardMetrics
from guard.probe.template import TEMPLATE_REF
from guard.probe.prober import Prober, ProbeResult
from guard.settings import DEFAULT_TOPICS
from guard.sse import completion_text
from guard.proxy.transport import pooled_client
from guard.proxy.upstream import Upstream, UpstreamFailure, UpstreamResponse

__all__ = [
    "CollectAborted",
    "CollectStats",
    "PromptItem",
    "PromptSet",
    "RetryPolicy",
    "add_collect_parser",
    "collect",
    "read_prompts",
    "run",
]

CHAT_PATH = "/chat/completions"
REQUEST_ID_PREFIX = "collect-"
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 512
DEFAULT_PROBE_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 300.0
FATAL_STATUSES = frozenset({401, 403, 404})
# Probe statuses that are an answer of the model (written); the others are failures (retried next run).
_WRITTEN_PROBE_STATUSES = frozenset({"ok", "cached", "unparseable"})


# --- prompt files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptItem:
    """One usable prompt row. ``id`` is the datapoint id (``paraphrase_of`` for a paraphrase row)."""

    id: str
    prompt: str
    topic: str | None
    harm_level: int | None
    source: str  # "file:line", for messages
    key: str  # hash of (id, prompt): the resume key, stable across runs and file order

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()


@dataclass
class PromptSet:
    items: list[PromptItem] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)  # "file:line: reason"


def _item_key(item_id: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([item_id, prompt], ensure_ascii=False).encode()).hexdigest()[:20]


def _text_field(row: dict[str, Any], name: str) -> str | None:
    """An optional id-like field: a non-empty string, or an integer (CSV/JSON ids such as 17)."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{name!r} must be a string or an integer, not {type(value).__name__}")
    return str(value).strip()


def _harm_level(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"'harm_level' must be an integer, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'harm_level' must be an integer, not {value!r}")
    return value


def _item(row: dict[str, Any], source: str) -> PromptItem:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty 'prompt'")
    own_id = _text_field(row, "id")
    paraphrase_of = _text_field(row, "paraphrase_of")
    topic = _text_field(row, "topic")
    harm = _harm_level(row.get("harm_level"))
    item_id = paraphrase_of or own_id or hashlib.sha256(prompt.encode()).hexdigest()
    return PromptItem(item_id, prompt, topic, harm, source, _item_key(item_id, prompt))


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield number, f"not valid JSON ({exc})"
                continue
            yield number, row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"


def _csv_rows(path: Path) -> Iterable[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            yield 1, f"CSV header {reader.fieldnames} has no 'prompt' column"
            return
        start = reader.line_num + 1  # the line a record starts on (quoted fields may span lines)
        for row in reader:
            if None in row:
                yield start, f"{len(row[None])} more field(s) than the header"  # type: ignore[index]
            elif any(v is None for v in row.values()):
                yield start, "fewer fields than the header"
            else:
                yield start, row
            start = reader.line_num + 1


def read_prompts(paths: Sequence[Path | str]) -> PromptSet:
    """Read JSONL (``.csv`` files: CSV with a header) prompt files; bad rows are listed, not fatal.

    Raises :class:`OSError` if a file cannot be opened. A row repeating an earlier (id, prompt) pair is
    reported as a duplicate and dropped.
    """
    out = PromptSet()
    seen: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
        for number, row in rows:
            source = f"{path}:{number}"
            if isinstance(row, str):
                out.bad_rows.append(f"{source}: {row}")
                continue
            try:
                item = _item(row, source)
            except ValueError as exc:
                out.bad_rows.append(f"{source}: {exc}")
                continue
            if item.key in seen:
                out.bad_rows.append(f"{source}: duplicate of {seen[item.key]} (same id and prompt)")
                continue
            seen[item.key] = source
            out.items.append(item)
    return out


# --- retries -----------------------------------------------------------------------------------------


class CollectAborted(RuntimeError):
    """The run cannot go on (the endpoint rejects every request the same way, or seems down)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter (delay ~ U(0, min(cap, base*2^k)))."""

    max_attempts: int = 5
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                return min(self.cap, max(0.0, float(retry_after)))
        return random.uniform(0.0, min(self.cap, self.base * 2 ** (attempt - 1)))

    def budget(self, attempt_timeout: float) -> float:
        """The longest a call can take with all its attempts and backoffs."""
        return self.max_attempts * attempt_timeout + (self.max_attempts - 1) * self.cap


def _retryable(answer: UpstreamResponse) -> bool:
    """429 and 5xx, except a 5xx that names ``response_format``: llama-cpp-python's server answers an
    unsupported probe dialect with a 500 validation error, which no retry changes (the prober steps down)."""
    return answer.status == 429 or (answer.status >= 500 and b"response_format" not in answer.body)


class _RetryingUpstream(Upstream):
    """An :class:`Upstream` whose ``request`` retries 429/5xx/transport errors and stops on 401/403/404.

    Each attempt is bounded by ``attempt_timeout`` (the caller's ``timeout`` can only shorten it), so the
    prober can be given the whole retry budget while ``--probe-timeout`` still bounds one attempt.
    """

    def __init__(self, inner: Upstream, policy: RetryPolicy, attempt_timeout: float, stats: "CollectStats") -> None:
        super().__init__(inner.client, inner.base_url, api_key=inner.api_key, total_timeout=attempt_timeout)
        self.policy = policy
        self.attempt_timeout = attempt_timeout
        self.stats = stats

    async def request(self, method: str, path: str, *, headers: Any, content: bytes | None = None,
                      timeout: float | None = None, query: bytes = b"") -> UpstreamResponse:
        per_attempt = min(timeout or self.attempt_timeout, self.attempt_timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await super().request(method, path, headers=headers, content=content, timeout=per_attempt,
                                               query=query)
            except UpstreamFailure as failure:
                if failure.reason == "timeout" or attempt >= self.policy.max_attempts:
                    self.stats.last_error = f"{failure.reason}: {failure.message}"
                    raise
                self.stats.retries[failure.reason] += 1
                await asyncio.sleep(self.policy.delay(attempt))
                continue
            if answer.status in FATAL_STATUSES:
                raise CollectAborted(f"the endpoint answered {answer.status} to {method} {self.base_url}{path}: "
                                     f"{_error_message(answer.body)}")
            if not _retryable(answer) or attempt >= self.policy.max_attempts:
                if answer.status != 200:
                    self.stats.last_error = f"HTTP {answer.status}: {_error_message(answer.body)}"
                return answer
            self.stats.retries[str(answer.status)] += 1
            retry_after = {k.lower(): v for k, v in answer.headers.items()}.get("retry-after")
            await asyncio.sleep(self.policy.delay(attempt, retry_after))


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return " ".join(str(message).split())[:300]
    except (ValueError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace") or "(empty body)"


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class CollectStats:
    """Counts of one run. ``planned == resumed + written + failed_total + not_run``."""

    prompts: int = 0  # usable prompt rows
    bad_rows: list[str] = field(default_factory=list)
    planned: int = 0  # prompts x repeats
    resumed: int = 0  # already in --out, skipped
    written: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> count
    retries: Counter[str] = field(default_factory=Counter)  # status or transport reason -> count
    probe_status: Counter[str] = field(default_factory=Counter)  # of written records
    refused: int = 0  # written records whose answer the detector labelled a refusal
    aborted: str | None = None
    last_error: str | None = None  # the endpoint's last error after retries (status and message), for diagnosis
    seconds: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def not_run(self) -> int:
        return self.planned - self.resumed - self.written - self.failed_total

    def summary(self) -> str:
        parts = [f"{self.written} written", f"{self.resumed} already done"]
        if self.failed:
            parts.append(f"{self.failed_total} failed ({', '.join(f'{n} {r}' for r, n in self.failed.most_common())})")
        if self.not_run:
            parts.append(f"{self.not_run} not run")
        parts.append(f"{len(self.bad_rows)} bad prompt rows")
        if self.retries:
            parts.append(f"{sum(self.retries.values())} retries "
                         f"({', '.join(f'{n}x {r}' for r, n in self.retries.most_common())})")
        probe = ", ".join(f"{s} {n}" for s, n in sorted(self.probe_status.items()))
        return (f"collect: {self.planned} items ({self.prompts} prompts): " + "; ".join(parts)
                + (f"; probe: {probe}" if probe else "") + f"; {self.refused} refusals; {self.seconds:.1f}s")


def _request_id(item: PromptItem, repeat: int) -> str:
    return f"{REQUEST_ID_PREFIX}{item.key}-{repeat}"


def read_done(out: Path, *, model: str, err: TextIO | None = None) -> set[str]:
    """Request ids of the items ``out`` already holds for ``model`` and this probe template.

    A torn last line (a crash mid-write: no trailing newline, not valid JSON) is cut off the file so the
    appended records start on a line of their own; other unreadable lines are left alone and counted.
    """
    done: set[str] = set()
    if not out.exists():
        return done
    other: Counter[tuple[Any, Any]] = Counter()
    bad = 0
    with out.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                json.loads(data[cut:])
            except ValueError:
                fh.truncate(cut)
                data = data[:cut]
                if err is not None:
                    print(f"collect: {out}: removed a torn last line (an interrupted write)", file=err)
            else:
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        rid = record.get("request_id")
        if not isinstance(rid, str) or not rid.startswith(REQUEST_ID_PREFIX):
            continue
        if record.get("model") == model and record.get("probe_template") == TEMPLATE_REF:
            done.add(rid)
        else:
            other[(record.get("model"), record.get("probe_template"))] += 1
    if err is not None:
        if bad:
            print(f"collect: {out}: {bad} unreadable line(s) ignored for resuming", file=err)
        for (m, t), n in other.items():
            print(f"collect: warning: {out} also holds {n} records of model {m!r} / template {t!r}; "
                  f"calibrate will ask you to separate them", file=err)
    return done


class _Progress:
    """One stderr line with count, rate and ETA: redrawn in place on a terminal, else a line every ~10%."""

    def __init__(self, total: int, stream: TextIO | None, stats: CollectStats) -> None:
        self.total, self.stream, self.stats = total, stream, stats
        self.done = 0
        self.started = time.monotonic()
        self.tty = bool(stream is not None and stream.isatty())
        self._last_draw = 0.0
        self._next_line = 0
        self._step = max(1, total // 10)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        pct = 100.0 * self.done / self.total if self.total else 100.0
        failed = self.stats.failed_total
        return (f"collect {self.done}/{self.total} ({pct:.0f}%) {rate:.2f} items/s "
                f"elapsed {_clock(elapsed)} ETA {_clock(eta) if eta is not None else '?'}"
                + (f" failed {failed}" if failed else "")
                + (f" retries {sum(self.stats.retries.values())}" if self.stats.retries else ""))

    def advance(self) -> None:
        self.done += 1
        if self.stream is None:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.2 or self.done == self.total:
                self._last_draw = now
                self.stream.write("\r\x1b[K" + self.line())
                self.stream.flush()
        elif self.done >= self._next_line or self.done == self.total:
            self._next_line = self.done + self._step
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.stream is not None and self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


async def collect(
    prompts: PromptSet | Sequence[PromptItem],
    *,
    endpoint: str,
    model: str,
    out: Path | str,
    repeats: int = 1,
    concurrency: int = 4,
    api_key: str | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    timeout: float = DEFAULT_TIMEOUT,
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    probe_max_tokens: int = 96,
    probe_structured_output: Literal["auto", "json_schema", "json_object", "none"] = "auto",
    probe_logprobs: bool = True,
    probe_cache: bool = True,
    topics: Sequence[str] = DEFAULT_TOPICS,
    strict_refusal: bool = False,
    retry: RetryPolicy = RetryPolicy(),
    max_consecutive_failures: int = 10,
    log: TextIO | None = None,
    progress: bool = True,
    http_client: httpx.AsyncClient | None = None,
    responses: Path | str | None = None,
) -> CollectStats:
    """Run probe -> fresh generation -> detector for each prompt x repeat not yet in ``out``.

    Records are appended to ``out`` (JSONL) and flushed as each item finishes. Returns the run's counts;
    ``stats.aborted`` says why the run stopped early (401/403/404 from the endpoint, or
    ``max_consecutive_failures`` failed items in a row), if it did. ``log`` (e.g. ``sys.stderr``) gets resume
    notes and, if ``progress``, the progress line; ``http_client`` is used instead of a fresh pooled client if given.
    ``responses`` (opt-in: it holds prompt and answer text) gets one ``{request_id, id, prompt, response}`` line
    per written datapoint, the input ``refusal-guard classify`` takes to re-label or audit a run.
    """
    if repeats < 1 or concurrency < 1:
        raise ValueError("repeats and concurrency must be at least 1")
    started = time.perf_counter()
    prompt_set = prompts if isinstance(prompts, PromptSet) else PromptSet(list(prompts))
    stats = CollectStats(prompts=len(prompt_set.items), bad_rows=list(prompt_set.bad_rows))
    out = Path(out)
    done = read_done(out, model=model, err=log)
    # Repeat-major: an interrupted run has covered every prompt once before any twice.
    todo = [(item, r) for r in range(repeats) for item in prompt_set.items]
    stats.planned = len(todo)
    todo = [(item, r) for item, r in todo if _request_id(item, r) not in done]
    stats.resumed = stats.planned - len(todo)
    if not todo:
        stats.seconds = time.perf_counter() - started
        return stats

    async with contextlib.AsyncExitStack() as stack:
        client = http_client or await stack.enter_async_context(pooled_client(
            timeout=httpx.Timeout(None, connect=10.0), max_connections=2 * concurrency + 2, keepalive_expiry=4.0,
        ))
        base = Upstream(client, endpoint, api_key=SecretStr(api_key) if api_key else None)
        probe_upstream = _RetryingUpstream(base, retry, probe_timeout, stats)
        gen_upstream = _RetryingUpstream(base, retry, timeout, stats)
        prober = Prober(
            probe_upstream, GuardMetrics(CollectorRegistry()), topics=topics,
            timeout=retry.budget(probe_timeout),  # one attempt is bounded by probe_timeout (see _RetryingUpstream)
            max_tokens=probe_max_tokens, structured_output=probe_structured_output, context="last_user",
            model=None, cache_size=len(prompt_set.items) + 1 if probe_cache else 0, cache_ttl=10 * 365 * 86400.0,
            circuit_failures=1 << 30, circuit_cooldown=1.0, logprobs=probe_logprobs,
        )
        detector = RefusalDetector()
        out.parent.mkdir(parents=True, exist_ok=True)
        sink = stack.enter_context(out.open("a", encoding="utf-8"))
        texts = stack.enter_context(Path(responses).open("a", encoding="utf-8")) if responses else None
        bar = _Progress(len(todo), log if progress else None, stats)
        stack.callback(bar.close)
        queue = iter(todo)
        consecutive = 0
        stop = asyncio.Event()

        async def one(item: PromptItem, repeat: int) -> tuple[dict[str, Any], str] | str:
            """The datapoint of one item and the answer's text, or the reason it failed."""
            t0 = time.perf_counter()
            request_id = _request_id(item, repeat)
            body = {"model": model, "messages": [{"role": "user", "content": item.prompt}],
                    "temperature": temperature, "max_tokens": max_tokens, "stream": False}
            raw = json.dumps(body, ensure_ascii=False).encode()
            chat = CHAT.parse(raw)
            # No x-request-id: llama-cpp-python's server answers 400 to one that is not a UUID.
            headers = base.forward_headers({"content-type": "application/json"})
            probe: ProbeResult = await prober.predict(chat, headers)
            if probe.status not in _WRITTEN_PROBE_STATUSES:
                return f"probe {probe.status}"
            gen_started = time.perf_counter()
            try:
                answer = await gen_upstream.request("POST", CHAT_PATH, headers=headers, content=raw)
            except UpstreamFailure as failure:
                return f"generation {failure.reason}"
            upstream_seconds = time.perf_counter() - gen_started
            if answer.status != 200:
                return f"generation status {answer.status}"
            text = completion_text(answer.body)
            if text is None:
                return "generation without text"
            label = await asyncio.to_thread(detector.label, text, item.prompt)  # the learned stage reads the prompt
            p = probe.prediction
            record: dict[str, Any] = {
                "id": item.id,
                "request_id": request_id,
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "model": model,
                # The probe's topic, as in the proxy's datapoints: calibrate certifies per-topic thresholds and
                # drift baselines for the cells the proxy will look them up by (its prediction), never the file's.
                "topic": p.topic if p else None,
                "harm_level": item.harm_level,
                "will_refuse": p.will_refuse if p else None,
                "confidence": p.confidence if p else None,
                "harm_rating": p.harm_rating if p else None,
                "p_refuse_logprob": p.p_refuse_logprob if p else None,
                "p_correct": None,
                "action": None,
                "mode": "collect",
                "probe_status": probe.status,
                "label": label.value,
                "refused": is_refusal(label, strict_refusal),
                "probe_ms": round(probe.seconds * 1000, 3),
                "upstream_ms": round(upstream_seconds * 1000, 3),
                "total_ms": round((time.perf_counter() - t0) * 1000, 3),
                "policy_version": None,
                "probe_template": TEMPLATE_REF,
                "prompt_sha256": item.prompt_sha256,
            }
            assert tuple(record) == FIELDS
            if item.topic is not None:
                record["prompt_topic"] = item.topic
            return record, text

        async def worker() -> None:
            nonlocal consecutive
            for item, repeat in queue:  # a shared iterator: each item goes to exactly one worker
                if stop.is_set():
                    return
                try:
                    result = await one(item, repeat)
                except CollectAborted as exc:
                    stats.aborted = str(exc)
                    stop.set()
                    return
                if isinstance(result, str):
                    stats.failed[result] += 1
                    consecutive += 1
                    if consecutive >= max_consecutive_failures and not stop.is_set():
                        stats.aborted = (f"{consecutive} items in a row failed (last: {result} at {item.source}"
                                         + (f"; endpoint said {stats.last_error}" if stats.last_error else "")
                                         + ")")
                        stop.set()
                else:
                    consecutive = 0
                    result, text = result
                    sink.write(json.dumps(result, ensure_ascii=False) + "\n")
                    sink.flush()
                    if texts is not None:
                        texts.write(json.dumps({"request_id": result["request_id"], "id": item.id,
                                                "prompt": item.prompt, "response": text}, ensure_ascii=False) + "\n")
                        texts.flush()
                    stats.written += 1
                    stats.probe_status[result["probe_status"]] += 1
                    stats.refused += bool(result["refused"])
                bar.advance()

        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
        try:
            await _first_abort(workers, stop)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    stats.seconds = time.perf_counter() - started
    return stats


async def _first_abort(workers: list[asyncio.Task[None]], stop: asyncio.Event) -> None:
    """Wait until every worker is done, or until one asks to stop (then cancel the in-flight items)."""
    stopper = asyncio.create_task(stop.wait())
    try:
        pending = set(workers)
        while pending:
            finished, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in finished:
                return
            for task in finished:
                task.result()  # re-raise a bug in a worker
            pending.discard(stopper)
    finally:
        stopper.cancel()


# --- command line ------------------------------------------------------------------------------------


def add_collect_parser(subparsers: Any) -> None:
    """Register the ``collect`` subcommand (``set_defaults(func=run)``)."""
    p = subparsers.add_parser(
        "collect", help="collect calibration datapoints from a model over a prompt set",
        description="For each prompt x repeat: ask the model the refusal-guard probe, send the prompt in a fresh "
                    "context, label the answer with the refusal detector, and append the datapoint (the proxy's "
                    "schema) to --out. Re-running with the same --out resumes.")
    p.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", required=True, help="model name sent to the endpoint and recorded")
    p.add_argument("--prompts", required=True, nargs="+", type=Path, metavar="FILE",
                   help="JSONL or .csv files with 'prompt' and optional id, topic, harm_level, paraphrase_of")
    p.add_argument("--out", required=True, type=Path, help="JSONL datapoints file (appended to; resumes)")
    p.add_argument("--repeats", type=int, default=1, help="generations per prompt (default 1)")
    p.add_argument("--concurrency", type=int, default=4, help="items in flight (default 4)")
    p.add_argument("--api-key", default=None,
                   help="bearer token for the endpoint (default: $OPENAI_API_KEY)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"temperature of the generation (default {DEFAULT_TEMPERATURE}; the probe always uses 0)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"max_tokens of the generation (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per generation attempt (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--probe-timeout", type=float, default=DEFAULT_PROBE_TIMEOUT,
                   help=f"seconds per probe attempt (default {DEFAULT_PROBE_TIMEOUT:g}; the proxy's is 2)")
    p.add_argument("--probe-max-tokens", type=int, default=96, help="max_tokens of the probe (default 96)")
    p.add_argument("--probe-structured-output", choices=["auto", "json_schema", "json_object", "none"],
                   default="auto", help="response_format of the probe; auto steps down on a 400 (default auto)")
    p.add_argument("--probe-logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for logprobs to record p_refuse_logprob (default on)")
    p.add_argument("--probe-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse a prompt's probe answer for its other repeats, as the proxy's cache would "
                        "(status 'cached'; default on)")
    p.add_argument("--topics", default=",".join(DEFAULT_TOPICS),
                   help="comma-separated topic list offered to the probe (default: the proxy's)")
    p.add_argument("--strict-refusal", action="store_true",
                   help="count only full refusals as refused (the proxy's strict_refusal)")
    p.add_argument("--max-attempts", type=int, default=5,
                   help="attempts per call on 429/5xx/transport errors (default 5)")
    p.add_argument("--max-consecutive-failures", type=int, default=10,
                   help="stop after this many failed items in a row (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--responses", type=Path, default=None, metavar="FILE",
                   help="also append {request_id, id, prompt, response} JSONL here (holds prompt and answer text; "
                        "input for `refusal-guard classify`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``collect``. Exit codes: 0 all items done; 1 some failed, were not run or bad rows were
    skipped; 2 bad input or the endpoint rejected the requests (401/403/404); 130 interrupted."""
    err = sys.stderr
    if not args.endpoint.startswith(("http://", "https://")):
        print(f"collect: error: --endpoint must be an http:// or https:// URL, not {args.endpoint!r}", file=err)
        return 2
    if args.repeats < 1 or args.concurrency < 1 or args.max_attempts < 1 or args.max_consecutive_failures < 1:
        print("collect: error: --repeats, --concurrency, --max-attempts and --max-consecutive-failures must be >= 1",
              file=err)
        return 2
    topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    if not topics or any(not t.replace("_", "").isalnum() or t == "other" for t in topics):
        print(f"collect: error: --topics must be plain words (letters, digits, _), not 'other': {args.topics!r}",
              file=err)
        return 2
    try:
        prompts = read_prompts(args.prompts)
    except OSError as exc:
        print(f"collect: error: {exc}", file=err)
        return 2
    for row in prompts.bad_rows:
        print(f"collect: bad row: {row}", file=err)
    print(f"collect: {len(prompts.items)} prompts from {len(args.prompts)} file(s), "
          f"{len(prompts.bad_rows)} bad rows skipped", file=err)
    if not prompts.items:
        print("collect: error: no usable prompts", file=err)
        return 2
    try:
        stats = asyncio.run(collect(
            prompts, endpoint=args.endpoint, model=args.model, out=args.out, repeats=args.repeats,
            concurrency=args.concurrency, api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
            temperature=args.temperature, max_tokens=args.max_tokens, timeout=args.timeout,
            probe_timeout=args.probe_timeout, probe_max_tokens=args.probe_max_tokens,
            probe_structured_output=args.probe_structured_output, probe_logprobs=args.probe_logprobs, probe_cache=args.probe_cache, topics=topics,
            strict_refusal=args.strict_refusal, retry=RetryPolicy(max_attempts=args.max_attempts),
            max_consecutive_failures=args.max_consecutive_failures,
            log=err, progress=not args.no_progress, responses=args.responses,
        ))
    except KeyboardInterrupt:
        print(f"\ncollect: interrupted; finished items are in {args.out}, re-run the same command to resume",
              file=err)
        return 130
    print(stats.summary(), file=err)
    if stats.failed:
        if stats.last_error:
            print(f"collect: last error from the endpoint: {stats.last_error}", file=err)
        print("collect: failed items are not written; re-run the same command to retry them", file=err)
    if stats.aborted:
        print(f"collect: stopped early: {stats.aborted}", file=err)
        return 2 if stats.aborted.startswith("the endpoint answered") else 1
    return 1 if (stats.failed or stats.not_run or stats.bad_rows) else 0
