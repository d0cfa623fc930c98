"""The serving engine: one worker thread owns the model and decodes every live request together.

Requests from any thread go into a queue. The worker takes what is waiting (up to `max_batch_size` rows; an idle
worker waits `batch_window_s` for a burst to gather), prefills it, and decodes all live rows one token per step,
each row under its own adapter via `AdaptedModel(..., adapter_names=[...])`, so a batch can mix any number of
adapters and the base model. Rows stream text as it is released and finish independently; new requests join at
the next step. Loading and unloading adapters also run on the worker, between two steps, so rows in flight are
never disturbed: an unload waits until no row uses the adapter, and refuses new requests for it meanwhile.

Tenants are isolated: every adapter file is checked as it loads (nora.io), and one adapter's failure while serving
ends its own requests only (decode_batch.py; a failed prefill is retried adapter by adapter). Shutting down
(`close`) refuses new work, lets the accepted requests run until a deadline, then ends each with an error event.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..layers import BASE
from ..model import AdaptedModel, check_adapter_name
from .decode_batch import DecodeBatch, adapter_failed, end_request, hf_model
from .errors import BadRequest, Busy, Conflict, GenerationFailed, LimitExceeded, LoadFailed, NotFound
from .events import Completion, Event, EventStream, GenerationRequest
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # rows decoded together
    batch_window_s: float = 0.005  # how long an idle worker waits for more requests before it starts a batch
    max_queue: int = 1024  # requests accepted and not yet finished; beyond it submit() raises Busy
    reserve_adapters: int = 0  # resident slots allocated up front per layout (no load then grows the stores)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.batch_window_s < 0 or self.reserve_adapters < 0:
            raise ValueError(
                f"{self}: max_batch_size and max_queue must be ≥ 1, batch_window_s and reserve_adapters ≥ 0."
            )


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str | None  # None: it came with the model
    created: int  # unix time it was loaded
    load_ms: float | None = None


@dataclass(eq=False)
class _Op:
    kind: str  # "load" | "unload"
    name: str
    path: str | None
    future: Future


_WAKE = object()


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, config: EngineConfig | None = None) -> None:
        """`model`: an AdaptedModel, or a bare base model (wrapped here, with no adapter yet)."""
        self.model = (model if isinstance(model, AdaptedModel) else AdaptedModel(model)).eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        if self.config.reserve_adapters:
            self.model.reserve_resident(self.config.reserve_adapters)
        hf = hf_model(self.model)
        text_config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)
        self.vocab_size: int = hf.get_input_embeddings().num_embeddings
        eos = {tokenizer.eos_token_id, *_as_list(getattr(hf.generation_config, "eos_token_id", None))}
        self.eos_ids = {int(e) for e in eos if e is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._batch = DecodeBatch(tokenizer, self.eos_ids, int(pad or 0))
        self._lock = threading.Lock()
        now = int(time.time())
        names = list(self.model.peft_config)
        self._adapters: dict[str, AdapterInfo] = {n: AdapterInfo(n, None, now) for n in names}
        self._changing: set[str] = set()  # names with a load or unload under way
        self._open = 0  # requests accepted and not yet finished
        self._closing = False
        self._deadline: float | None = None  # when closing: the monotonic time at which running requests end
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[GenerationRequest] = deque()
        self._ops: list[_Op] = []
        self._thread: threading.Thread | None = None
        self.stats = {"prefills": 0, "steps": 0, "peak_rows": 0}  # for monitoring (written by the worker only)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nora-serve-worker", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new work from now on; the requests already accepted get `timeout` seconds (None: as long as they
        need) to finish, then each ends with an error event (code server_shutdown). Returns at once."""
        with self._lock:
            self._closing = True
            if timeout is not None:
                deadline = time.monotonic() + timeout
                self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
        self._inbox.put(_WAKE)

    def stop(self, timeout: float | None = 30.0) -> None:
        """`close(timeout)`, then wait for the worker thread to end."""
        self.close(timeout)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- adapters --------------------------------------------------------------------------------------------
    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [a for n, a in self._adapters.items() if n not in self._changing]

    def request_load(self, name: str, path: str) -> Future:
        """Load the adapter saved in `path` as `name` between two decode steps; the future gives the load time
        in milliseconds."""
        try:
            check_adapter_name(name)
        except AdapterError as e:
            raise BadRequest(str(e), "name") from e
        with self._lock:
            self._refuse_if_closing()
            if name in self._adapters or name in self._changing:
                raise Conflict(f"an adapter named {name!r} is already loaded; unload it first or pick a new name.")
            self._changing.add(name)
            return self._enqueue_op("load", name, path)

    def request_unload(self, name: str) -> Future:
        """Unload `name` once no running request uses it; new requests for it are refused from now on."""
        with self._lock:
            self._refuse_if_closing()
            if name not in self._adapters or name in self._changing:
                raise NotFound(f"no adapter named {name!r} is loaded; loaded: {sorted(self._adapters)}.", "name")
            self._changing.add(name)
            return self._enqueue_op("unload", name, None)

    def load_adapter(self, name: str, path: str, timeout: float | None = None) -> float:
        return self.request_load(name, path).result(timeout)

    def unload_adapter(self, name: str, timeout: float | None = None) -> float:
        return self.request_unload(name).result(timeout)

    def _enqueue_op(self, kind: str, name: str, path: str | None) -> Future:
        op = _Op(kind, name, path, Future())
        self._inbox.put(op)
        return op.future

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise Busy("the server is shutting down; retry on another instance or after it restarts.")

    # ---- generation ------------------------------------------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], adapter: str, params: SamplingParams, sink: Callable[[Event], None]
    ) -> GenerationRequest:
        """Queue one generation; `sink` receives its events on the worker thread."""
        self._check_prompt(prompt_ids, params)
        with self._lock:
            self._refuse_if_closing()
            if adapter != BASE and (adapter not in self._adapters or adapter in self._changing):
                loaded = sorted(n for n in self._adapters if n not in self._changing)
                raise NotFound(
                    f"model {adapter!r} is not loaded; loaded adapters: {loaded}, and {BASE!r} for the base model. "
                    "Load an adapter with POST /v1/adapters.",
                    "model",
                )
            if self._open >= self.config.max_queue:
                raise Busy(f"{self._open} requests are already queued (max_queue); retry shortly.")
            self._open += 1
            request = GenerationRequest(list(prompt_ids), adapter, params, self._counted(sink))
            self._inbox.put(request)
        return request

    def open_stream(self, prompts: list[list[int]], adapter: str, params: SamplingParams) -> EventStream:
        """Submit prompts together and return their events for asyncio code (call on the event loop)."""
        stream = EventStream(len(prompts))
        try:
            for i, ids in enumerate(prompts):
                stream.requests.append(self.submit(ids, adapter, params, stream.sink(i)))
        except BaseException:
            stream.cancel()
            raise
        return stream

    def generate(
        self, prompt_ids: list[int], adapter: str = BASE, params: SamplingParams | None = None, timeout: float = 300
    ) -> Completion:
        """Blocking convenience: submit one prompt and wait for its completion."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        request = self.submit(prompt_ids, adapter, params or SamplingParams(), events.put)
        pieces = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = events.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                request.cancel()
                raise TimeoutError(f"no completion within {timeout} s; is the engine started?") from None
            pieces.append(event.text)
            if event.finish_reason is not None:
                break
        if event.error:
            raise GenerationFailed(event.error, code=event.error_code)
        return Completion(
            "".join(pieces), list(event.token_ids), event.finish_reason, event.prompt_tokens, event.completion_tokens
        )

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise BadRequest("the prompt is empty after tokenization; send at least one token.", "prompt")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise BadRequest(f"prompt token ids must lie in [0, {self.vocab_size}) for this model.", "prompt")
        if self.context_length is not None and len(prompt_ids) + params.max_tokens > self.context_length:
            raise LimitExceeded(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens; shorten the prompt or lower max_tokens.",
                "max_tokens",
            )

    def _counted(self, sink: Callable[[Event], None]) -> Callable[[Event], None]:
        def counted(event: Event) -> None:
            if event.finish_reason is not None:
                with self._lock:
                    self._open -= 1
            sink(event)

        return counted

    # ---- the worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                self._collect(block=not (self._batch or self._waiting or self._ops), timeout=self._time_left())
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    break
                self._run_ops()
                self._admit()
                if self._batch:
                    self._batch.step(self.model)
                    self.stats["steps"] += 1
                elif self._closing and not (self._waiting or self._ops) and self._inbox.empty():
                    break
            except Exception as e:  # keep serving: fail the rows of the broken step only
                log.exception("decode step failed")
                self._batch.end_all("error", f"generation failed: {type(e).__name__}: {e}")
        gone = "the server shut down before this request finished; retry it on another instance or after a restart."
        self._batch.end_all("abort", gone, "server_shutdown")
        self._collect(block=False)
        while self._waiting:
            end_request(self._waiting.popleft(), "abort", gone, "server_shutdown")
        for op in self._ops:
            op.future.set_exception(Busy("the server shut down before this adapter change ran."))

    def _time_left(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def _collect(self, block: bool, timeout: float | None = None) -> None:
        """Move what is in the inbox to the worker's lists; when idle, wait for work (at most `timeout` seconds)
        and then for a burst."""
        items = []
        if block:
            try:
                items.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return
            if isinstance(items[0], GenerationRequest):
                deadline = time.monotonic() + self.config.batch_window_s
                while len(items) < self.config.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    try:
                        items.append(self._inbox.get(timeout=left))
                    except queue.Empty:
                        break
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, GenerationRequest):
                self._waiting.append(item)
            elif isinstance(item, _Op):
                self._ops.append(item)

    def _admit(self) -> None:
        room = self.config.max_batch_size - len(self._batch)
        if room <= 0 or not self._waiting or not self._batch.can_join():
            return
        chosen: list[GenerationRequest] = []
        while self._waiting and len(chosen) < room:
            request = self._waiting.popleft()
            if request.cancelled:
                end_request(request, "abort")
            else:
                chosen.append(request)
        if not chosen:
            return
        running = len(self._batch)
        groups: dict[str, list[GenerationRequest]] = {}
        for request in chosen:
            groups.setdefault(request.adapter, []).append(request)
        try:
            self._prefill(chosen)
        except Exception as e:
            if self._joined(chosen):
                raise  # they joined the batch: the loop ends every row
            # one prefill per adapter, so that a failing adapter's requests fail alone
            failed = {chosen[0].adapter: e} if len(groups) == 1 else self._prefill_apart(groups)
            for adapter, error in failed.items():
                log.error("prefill failed for %s: %s: %s", adapter, type(error).__name__, error, exc_info=error)
                for request in groups[adapter]:
                    end_request(request, "error", adapter_failed(adapter, error), "adapter_failed")
        self.stats["peak_rows"] = max(self.stats["peak_rows"], running + len(chosen))

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        self._batch.prefill(self.model, requests)
        self.stats["prefills"] += 1

    def _prefill_apart(self, groups: dict[str, list[GenerationRequest]]) -> dict[str, Exception]:
        failed: dict[str, Exception] = {}
        for adapter, part in groups.items():
            try:
                self._prefill(part)
            except Exception as e:
                if self._joined(part):
                    raise
                failed[adapter] = e
        return failed

    def _joined(self, requests: list[GenerationRequest]) -> bool:
        return any(row.request in requests for row in self._batch.rows)

    def _run_ops(self) -> None:
        in_use = self._batch.adapters_in_use() | {r.adapter for r in self._waiting}
        for op in list(self._ops):
            if op.kind == "unload" and op.name in in_use:
                continue  # wait for the rows using it to finish
            self._ops.remove(op)
            try:
                ms = self._load(op.name, op.path) if op.kind == "load" else self._unload(op.name)
            except Exception as e:
                with self._lock:
                    self._changing.discard(op.name)
                op.future.set_exception(e)
                continue
            with self._lock:
                self._changing.discard(op.name)
                if op.kind == "load":
                    self._adapters[op.name] = AdapterInfo(op.name, op.path, int(time.time()), ms)
                else:
                    del self._adapters[op.name]
            op.future.set_result(ms)

    @torch.no_grad()
    def _load(self, name: str, path: str | None) -> float:
        assert path is not None
        start = time.perf_counter()
        try:
            # inference-only: frozen, in eval mode, and a resident slot where the method allows (O(1))
            self.model.load_adapter(path, name)
            self.model.eval_mode_frozen()
        except AdapterError as e:
            raise BadRequest(str(e), "path", "invalid_adapter") from e
        except Exception as e:  # not a refusal of the file: say what failed, the server goes on without it
            log.error("loading adapter %r from %s failed", name, path, exc_info=e)
            raise LoadFailed(f"loading adapter {name!r} from {path} failed: {type(e).__name__}: {e}") from e
        return (time.perf_counter() - start) * 1000

    @torch.no_grad()
    def _unload(self, name: str) -> float:
        start = time.perf_counter()
        self.model.delete_adapter(name)
        self.model.eval_mode_frozen()
        return (time.perf_counter() - start) * 1000


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
