"""What a command shows on the console, and what it keeps in its log file.

The console is for a person: one line per step that matters (a teacher started and finished, a
shard written, a trial finished), one live line or bar per teacher while it trains, warnings
and errors in full, then the table and where everything is. The log file
(``<output_dir>/logs/<command>-<YYYYmmdd-HHMMSS>.log``) is for when something went wrong: it
holds every console line, every log record of every library at INFO and above (MLflow's schema
migration, Ray's start line, Tune's result files, ...), every line the Ray workers print (the
loop's per-epoch line included, with the worker's task name and process id), and the full
traceback of an error. Three levels (``-q``, default, ``-v``):

=========================  =========  ==========  ===========
what                       ``-q``     default     ``-v``
=========================  =========  ==========  ===========
the table and the paths    console    console     console
steps, live lines, bars    file       console     console
warnings (driver, worker)  file       console     console
INFO of MLflow/Ray/Tune    file       file        console
per-epoch worker lines     file       file        console
an error's traceback       file       file        console
=========================  =========  ==========  ===========

How the workers' lines get here: Ray streams every worker's stdout and stderr to the driver,
where its own printer (``print_to_stdstream``) writes them to the driver's stdout and stderr
prefixed with ``(task pid=...)`` in colour (``RAY_COLOR_PREFIX`` only picks the colours) and
deduplicated. :func:`route_worker_output` puts :meth:`Console.worker_lines` in its place on Ray's
dispatcher: stdout lines (the per-epoch lines) go to the file (and the console with ``-v``);
stderr lines (warnings, errors) and the raylet's and autoscaler's messages go to the file and the
console, prefixed with the task's name only. Only the driver writes the log file, so on a cluster
it holds every node's lines whether or not the output folder is shared.

The live lines: :class:`Live` draws one bar (a terminal) or a plain line every 30 s for a unit of
work; :mod:`ensemble_kd.core.progress` feeds it from a training run's progress file.

Nothing here imports the rest of the package, and Ray only inside :func:`route_worker_output`:
the CLI sets the console up before the heavy imports, and library callers that never start it
get plain ``print``-like behaviour.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ensemble_kd.core import layout

QUIET, NORMAL, VERBOSE = 0, 1, 2
LIVE_LINE_INTERVAL_S = 30.0  # a live line without a bar (a pipe, a file) is printed at most this often
EARLY_LINES = 10_000  # lines kept for the log file before it is opened (the config is read first)
RAY_PRINTER = "ray_print_logs"  # Ray's own handler on its worker-output dispatcher (ray._private.worker)
OUR_PRINTER = "ekd_console"
AUTOSCALER_EVENT = ":event_summary:"  # ray_constants.LOG_PREFIX_EVENT_SUMMARY: what Ray's printer shows of the autoscaler
ADOPTED_LOGGERS = ("ray", "mlflow")  # libraries that give their logger a console handler of its own
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # colour and cursor escapes (Ray colours its remote tracebacks)


class _DropTrialTraceback(logging.Filter):
    """Tune logs every failed trial's whole traceback at ERROR ("Trial task failed for trial
    ..."); the sweep prints its own line per failed trial with the project's message, so the
    traceback goes to the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("ray.tune") and record.getMessage().startswith("Trial task failed"))


class _ToFile(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.to_file(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _ToConsole(logging.Handler):
    def __init__(self, console: Console, level: int) -> None:
        super().__init__(level)
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.addFilter(_DropTrialTraceback())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.to_console(self.format(record), err=True)
        except Exception:  # noqa: BLE001
            self.handleError(record)


class Console:
    """The command's console and log file (one per process: :data:`CONSOLE`). Every method is
    safe to call from any thread (the stages log from several); each line is written whole."""

    def __init__(self) -> None:
        self.level = NORMAL
        self.interactive = False  # stderr is a terminal: bars may be drawn
        self.log_path: Path | None = None
        self.command: str | None = None
        self._file: TextIO | None = None
        self._early: list[str] | None = None  # lines for the log file before it exists (a command has started)
        self._lock = threading.RLock()
        self._started = time.time()
        self._saved: dict[str, Any] = {}  # logging state to put back at the end of the command
        self._handlers: list[logging.Handler] = []
        self._seen: set[str] = set()  # worker stderr batches already on the console (each worker warns alike)

    def __reduce__(self):  # a log callable is pickled with what holds it (Tune pickles its callbacks):
        return (_process_console, ())  # it stands for the console of whichever process unpickles it

    # -- the two sinks --------------------------------------------------------------------

    def to_file(self, text: str) -> None:
        """Lines into the log file (kept until it is opened, once a command has started)."""
        stamp = time.strftime("%H:%M:%S")
        lines = [f"{stamp} {ln}" for ln in (ANSI.sub("", text).splitlines() or [""])]
        with self._lock:
            if self._file is not None:
                self._file.write("\n".join(lines) + "\n")
                self._file.flush()
            elif self._early is not None and len(self._early) < EARLY_LINES:
                self._early.extend(lines)

    def to_console(self, text: str, err: bool = False) -> None:
        """Lines onto stdout (``err``: stderr), whole, above any live bars; escape codes only on a
        terminal."""
        stream = sys.stderr if err else sys.stdout  # looked up now: tests capture them
        if not self.interactive:
            text = ANSI.sub("", text)
        with self._lock:
            if self.interactive and getattr(tqdm, "_instances", None):
                tqdm.write(text, file=stream)  # clears the bars, writes, redraws them
            else:
                stream.write(text + "\n")
            stream.flush()

    # -- what the stages and commands say ----------------------------------------------------

    def say(self, msg: str) -> None:
        """A step: console unless ``-q``; the file."""
        self.to_file(msg)
        if self.level >= NORMAL:
            self.to_console(msg)

    def result(self, msg: str, err: bool = False) -> None:
        """The table and where things are: always on the console (``err``: on stderr, so that a
        command whose stdout is JSON stays parseable); the file."""
        self.to_file(msg)
        self.to_console(msg, err=err)

    def detail(self, msg: str) -> None:
        """Details (per-epoch lines, tracebacks): the file; the console with ``-v``."""
        self.to_file(msg)
        if self.level >= VERBOSE:
            self.to_console(msg)

    def warn(self, msg: str) -> None:
        self.to_file(f"WARNING {msg}")
        if self.level >= NORMAL:
            self.to_console(msg, err=True)

    def error(self, msg: str) -> None:
        self.to_file(msg)
        self.to_console(msg, err=True)

    def traceback(self, e: BaseException) -> None:
        """``e``'s full traceback (a Ray error's includes the remote one) into the file, and onto
        the console (stderr) with ``-v``."""
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()
        self.to_file(text)
        if self.level >= VERBOSE:
            self.to_console(text, err=True)

    # -- the workers' output (Ray's log stream) -----------------------------------------------

    def worker_lines(self, data: dict[str, Any]) -> None:
        """One batch of a worker's output as Ray's log stream delivers it (``lines``, ``pid``,
        ``is_err``, ``task_name`` or ``actor_name``, ``ip``): all to the file with the process id;
        stderr and the raylet's/autoscaler's lines to the console (``-q``: not), stdout lines to
        the console with ``-v``. No colour, no process id on the console; a batch of stderr lines
        that another worker already printed word for word (a library's warning, from each worker
        of a group) is shown once, as Ray's own printer deduplicates."""
        pid = data.get("pid")
        system = pid in ("raylet", "autoscaler", "gcs_server")
        name = str(pid) if system else (data.get("actor_name") or data.get("task_name") or "worker")
        ip = data.get("ip")
        where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
        err = bool(data.get("is_err")) or system
        shown = self.level >= (NORMAL if err else VERBOSE)
        lines = data.get("lines") or ()
        if pid == "autoscaler":  # its status dumps stay in Ray's own logs; only its events are for people (as Ray does)
            lines = [ln.split(AUTOSCALER_EVENT, 1)[1] for ln in lines if AUTOSCALER_EVENT in ln]
        if shown and err and lines:
            key = "\n".join(lines)
            with self._lock:
                shown = key not in self._seen
                if len(self._seen) < EARLY_LINES:
                    self._seen.add(key)
        for line in lines:
            if "__ray_tqdm_magic_token__" in line:  # ray.experimental.tqdm_ray's bar state (RAY_TQDM_MAGIC)
                continue
            self.to_file(f"({name}{'' if system else f' pid={pid}'}{where}{' stderr' if err else ''}) {line}")
            if shown:
                self.to_console(f"({name}{where}) {line}", err=err)

    # -- a command's life ----------------------------------------------------------------------

    def start(self, command: str, level: int = NORMAL) -> None:
        """A command begins: its verbosity, its lines kept for the log file, every library's log
        records routed here (INFO and up to the file; WARNING and up to the console, INFO with
        ``-v``, ERROR with ``-q``), Python warnings as log records. :meth:`finish` undoes it."""
        with self._lock:
            self.command, self.level, self._started = command, level, time.time()
            self._seen = set()
            self.interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
            self._early = []
            root = logging.getLogger()
            self._saved = {"root_level": root.level, "warnings": logging._warnings_showwarning is not None,  # type: ignore[attr-defined]
                           "loggers": {}, "root_handlers": list(root.handlers)}
            for h in list(root.handlers):  # e.g. a library's logging.basicConfig at import: it would print everything twice
                root.removeHandler(h)
            console_level = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}[level]
            self._handlers = [_ToFile(self), _ToConsole(self, console_level)]
            for h in self._handlers:
                root.addHandler(h)
            root.setLevel(logging.INFO)
            logging.captureWarnings(True)
        self.adopt_loggers()

    def adopt_loggers(self) -> None:
        """Route the loggers that libraries give a console handler of their own (Ray's at its
        import and ``ray.init``, MLflow's at its import) through the root logger's handlers, i.e.
        here. Called again after those imports; each logger's own state is put back by
        :meth:`finish`."""
        if not self._handlers:
            return
        with self._lock:
            for name in ADOPTED_LOGGERS:
                lg = logging.getLogger(name)
                saved = self._saved["loggers"]
                if name not in saved:
                    saved[name] = (list(lg.handlers), lg.propagate)
                lg.handlers.clear()
                lg.propagate = True

    def open_log(self, output_dir: str | Path, argv: list[str] | None = None) -> Path:
        """Create ``<output_dir>/logs/<command>-<start time>.log`` and write what was said so far
        into it. Returns its path."""
        with self._lock:
            if self._file is not None:
                return self.log_path
            logs = layout.logs(output_dir)
            logs.mkdir(parents=True, exist_ok=True)
            stem = f"{(self.command or 'ensemble-kd').replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(self._started))}"
            path, n = logs / f"{stem}.log", 1
            while path.exists():  # two commands started in the same second
                n += 1
                path = logs / f"{stem}-{n}.log"
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by finish()
            self.log_path = path
            head = f"# ensemble-kd {' '.join(argv if argv is not None else sys.argv[1:])} (pid {os.getpid()}, cwd {os.getcwd()})"
            self._file.write(f"{time.strftime('%H:%M:%S')} {head}\n" + "".join(f"{ln}\n" for ln in self._early or ()))
            self._file.flush()
            self._early = None
            return path

    def finish(self) -> None:
        """The command ended: the log file closed, the logging state put back as it was."""
        with self._lock:
            root = logging.getLogger()
            for h in self._handlers:
                root.removeHandler(h)
            self._handlers = []
            if self._saved:
                for h in self._saved["root_handlers"]:
                    root.addHandler(h)
                root.setLevel(self._saved["root_level"])
                if not self._saved["warnings"]:
                    logging.captureWarnings(False)
                for name, (handlers, propagate) in self._saved["loggers"].items():
                    lg = logging.getLogger(name)
                    lg.handlers[:] = handlers
                    lg.propagate = propagate
            self._saved = {}
            if self._file is not None:
                self._file.close()
            self._file, self._early, self.log_path, self.command = None, None, None, None
            self.level, self.interactive = NORMAL, False


CONSOLE = Console()
"""This process's console: the CLI starts and finishes it around a command."""


def _process_console() -> Console:
    return CONSOLE


class Log:
    """The ``log`` callable the pipeline and stages take: a call is a step (:meth:`Console.say`);
    ``.result`` the table and paths, ``.detail`` the details. A plain function (``print``, a
    test's ``list.append``) works wherever this does: callers use ``getattr(log, "result", log)``."""

    def __init__(self, console: Console = CONSOLE) -> None:
        self.console = console

    def __call__(self, msg: str) -> None:
        self.console.say(msg)

    def result(self, msg: str) -> None:
        self.console.result(msg)

    def detail(self, msg: str) -> None:
        self.console.detail(msg)


def route_worker_output(console: Console = CONSOLE) -> Callable[[], None]:
    """Put :meth:`Console.worker_lines` in place of Ray's printer of the workers' output (after
    ``ray.init(log_to_driver=True)``, which installs it); returns the function that undoes it
    (call it after ``ray.shutdown()``, which drains the stream). A Ray without that dispatcher
    (another version) keeps its own printer: its lines then look as Ray prints them."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return lambda: None
    names = [n for n, _ in getattr(dispatcher, "handlers", [])]
    if RAY_PRINTER not in names:  # log_to_driver=False: nothing streams to this process
        return lambda: None
    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(OUR_PRINTER, console.worker_lines)

    def undo() -> None:
        dispatcher.remove_handler(OUR_PRINTER)

    return undo


class Live:
    """One live line for a unit of work (a teacher training): a tqdm bar on a terminal (``bar``),
    else a plain line through ``log`` at most every :data:`LIVE_LINE_INTERVAL_S` seconds (a pipe or
    a file gets no bar redraws). ``update(n, text, short)``: ``n`` units of ``total`` done, ``text``
    the line to print, ``short`` what the bar shows beside its own count and times (default: ``text``)."""

    def __init__(self, desc: str, total: int, log: Callable[[str], None], bar: bool, position: int = 0,
                 unit: str = "epoch") -> None:
        self.desc, self.total, self.log = desc, total, log
        self.last = time.monotonic()
        self.n = 0
        self._bar = tqdm(total=total, desc=desc, unit=unit, position=position, leave=False, file=sys.stderr,
                         dynamic_ncols=True) if bar else None

    def update(self, n: int, text: str, short: str | None = None) -> None:
        if n == self.n:
            return
        self.n = n
        if self._bar is not None:
            self._bar.n = n
            self._bar.set_postfix_str(text if short is None else short, refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self.last >= LIVE_LINE_INTERVAL_S and n < self.total:
            self.last = time.monotonic()
            self.log(f"{self.desc}: {text}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
