"""`nanoflow run-batch -i requests.jsonl -o results.jsonl`: an OpenAI batch file through the engine.

Each input line is {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body"};
each output line is {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}. Bodies are
validated and answered exactly as `nanoflow serve` does (server/protocol.py models, OpenAIServing.prepare_* and
full_response). Lines are read, validated and tokenized only as the engine admits work (stream.py), results are
appended and flushed as they finish, and a re-run with the same output file skips the custom_ids already there.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from pydantic import ValidationError

from nanoflow.batch.stream import DEFAULT_LOOKAHEAD, BatchItem, stream_outputs
from nanoflow.outputs import RequestOutput
from nanoflow.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body

ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch")
    g.add_argument("-i", "--input-file", required=True, help="OpenAI batch input (JSONL)")
    g.add_argument("-o", "--output-file", required=True,
                   help="results (JSONL), appended; an existing file's custom_ids are skipped (resume)")
    g.add_argument("--served-model-name", action="append", default=None,
                   help="name(s) a body's `model` may use (default: the --model value or file name)")
    g.add_argument("--lookahead", type=int, default=DEFAULT_LOOKAHEAD,
                   help="input lines read ahead of admission (the window prefix grouping reorders)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class _Pending:
    """An input line in the engine: one engine request per prompt (completions take a list)."""
    custom_id: str
    job: object  # serving.Job
    finals: list[RequestOutput | None]
    left: int
    failed: bool = False


@dataclass
class _Counts:
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)


class ResultWriter:
    """Appends one JSON line per result and flushes it, so an interrupted job loses nothing written."""

    def __init__(self, f: IO[str], counts: _Counts, bar=None) -> None:
        self.f, self.counts, self.bar = f, counts, bar

    def write(self, custom_id: str | None, status: int, body: dict, request_id: str | None = None) -> None:
        failed = status != 200
        rec = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
               "response": {"status_code": status, "request_id": request_id or f"batch-{uuid.uuid4().hex}",
                            "body": body},
               "error": body["error"] if failed else None}
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        if self.bar is not None:
            self.bar.update(1)
        if failed:
            self.counts.errors += 1
        else:
            self.counts.ok += 1

    def error(self, custom_id: str | None, e: APIError) -> None:
        self.write(custom_id, e.status, e.body())


def read_done(path: Path) -> set[str]:
    """custom_ids already answered in `path`; a truncated or unreadable last line (a killed run) is cut off."""
    done: set[str] = set()
    if not path.exists():
        return done
    good_end = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                break
            if rec.get("custom_id") is not None:
                done.add(rec["custom_id"])
            good_end += len(line)
    if good_end < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def parse_line(serving, line: str, lineno: int, skip: set[str]) -> tuple[str | None, object]:
    """(custom_id, prepared Job | APIError to answer | None: already answered, skipped unprepared)."""
    from nanoflow.server.app import _describe  # the server's own wording for pydantic errors
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, APIError(f"line {lineno}: invalid JSON: {e}")
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        return None, APIError(f"line {lineno}: expected an object with a non-empty string custom_id", "custom_id")
    if custom_id in skip:
        return custom_id, None
    try:
        if obj.get("method", "POST") != "POST":
            raise APIError(f"method must be POST, got {obj.get('method')!r}", "method")
        model = ENDPOINTS.get(obj.get("url"))
        if model is None:
            raise APIError(f"url must be one of {', '.join(ENDPOINTS)}, got {obj.get('url')!r}", "url", 404,
                           "NotFoundError")
        try:
            req = model.model_validate(obj.get("body"))
        except ValidationError as e:
            raise APIError(*_describe(e.errors())) from None
        if req.stream:
            raise APIError("stream is not supported in a batch job", "stream")
        return custom_id, serving.prepare_completion(req) if model is CompletionRequest else serving.prepare_chat(req)
    except APIError as e:
        return custom_id, e


def _items(serving, lines: IO[str], done: set[str], writer: ResultWriter) -> Iterator[BatchItem]:
    """Engine requests of the input, read and prepared lazily; bad lines are answered right here."""
    counts, seen = writer.counts, set(done)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        custom_id, job = parse_line(serving, line, lineno, seen)
        if job is None:
            if custom_id in done:
                counts.skipped += 1
            else:
                writer.error(custom_id, APIError(f"duplicate custom_id {custom_id!r} (line {lineno})", "custom_id"))
            continue
        if custom_id is not None:
            seen.add(custom_id)
        if isinstance(job, APIError):
            writer.error(custom_id, job)
            continue
        counts.pending[lineno] = _Pending(custom_id, job, [None] * len(job.prompts), len(job.prompts))
        for i, ((text, ids), p) in enumerate(zip(job.prompts, job.params)):
            yield BatchItem((lineno, i), ids, p, text)


def run_job(engine, serving, input_path: Path, output_path: Path, lookahead: int = DEFAULT_LOOKAHEAD,
            progress: bool = True) -> _Counts:
    """Run the batch file through `engine` (LLMEngine or DataParallelEngine); returns what happened."""
    from tqdm.auto import tqdm
    done = read_done(output_path)
    counts = _Counts()
    with open(input_path, encoding="utf-8") as lines, open(output_path, "a", encoding="utf-8") as out, \
            tqdm(total=max(0, _count_lines(input_path) - len(done)), desc="run-batch", unit="req",
                 disable=not progress, dynamic_ncols=True) as bar:
        writer = ResultWriter(out, counts, bar)

        def on_reject(key, e: ValueError) -> None:  # the engine's own checks (rare: serving validated first)
            pend = counts.pending[key[0]]
            if not pend.failed:
                pend.failed = True
                writer.error(pend.custom_id, APIError(str(e)))
            _settle(counts, key[0], pend)

        for (lineno, i), out_ in stream_outputs(engine, _items(serving, lines, done, writer), lookahead=lookahead,
                                                on_reject=on_reject, bar=bar, count=False):
            pend = counts.pending[lineno]
            pend.finals[i] = out_
            if _settle(counts, lineno, pend) and not pend.failed:
                writer.write(pend.custom_id, 200, serving.full_response(pend.job, pend.finals), pend.job.rid)
    return counts


def _settle(counts: _Counts, lineno: int, pend: _Pending) -> bool:
    """Count one engine request of the line as done; True (and forgotten) when it was the last."""
    pend.left -= 1
    if pend.left:
        return False
    del counts.pending[lineno]
    return True


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def run(args: argparse.Namespace) -> int:
    from nanoflow.config import engine_config_from_args
    from nanoflow.engine.data_parallel import make_engine
    from nanoflow.server.app import _default_name
    from nanoflow.server.serving import OpenAIServing
    inp, outp = Path(args.input_file), Path(args.output_file)
    if not inp.is_file():
        raise FileNotFoundError(f"no input file {inp}")
    config = engine_config_from_args(args)
    engine = make_engine(config)
    serving = OpenAIServing(_EngineView(engine), args.served_model_name or [_default_name(config.model)])
    # SIGTERM ends the job like Ctrl-C: running requests are aborted, every finished line is already on disk.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        counts = run_job(engine, serving, inp, outp, args.lookahead, not args.no_progress)
    finally:
        getattr(engine, "shutdown", lambda: None)()
    print(f"run-batch: {counts.ok} ok, {counts.errors} errors, {counts.skipped} already in {outp}", file=sys.stderr)
    return 0


class _EngineView:
    """What OpenAIServing reads from its AsyncEngine: `.engine`, the core engine (tokenizer, limits)."""

    def __init__(self, engine) -> None:
        self.engine = engine
