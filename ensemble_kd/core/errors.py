"""The project's own errors, and finding one inside the wrappers Ray puts around it.

Every exception class the project raises on purpose (``ConfigError``, ``ShardError``,
``CheckpointError``, ``StateFileError``, ``NonFiniteError``, ``DiskFullError``, ...) also derives from
:class:`ProjectError` (defined in ``modalities.errors``, the bottom layer, so that the dataset and
registry errors there carry it too). Raised in the driver, it reaches ``cli.main`` as it is.
Raised in a Ray worker, it comes back wrapped, and the useful sentence ends up at the bottom of a
long remote traceback:

- a Ray task (an embed task, a local-mode training task, a Tune trial's function): a
  ``ray.exceptions.RayTaskError`` whose ``cause`` is the original exception. Ray also makes the
  wrapper an instance of the original class (``RayTaskError(StateFileError)``), but its ``str`` is
  the whole remote traceback, so the wrapper itself is never taken for the error;
- a Ray Train worker group (Ray Train V2): ``trainer.fit()``'s ``TrainingFailedError`` is a
  ``WorkerGroupError`` whose ``worker_failures`` maps each failed rank to its exception (Ray
  Train unwraps its own ``UserExceptionWithTraceback``, whose ``_base_exc`` is kept here too), or a
  ``ControllerError`` whose ``controller_failure`` holds the cause;
- a Tune trial: the trial's ``RayTaskError`` (``ResultGrid`` ``Result.error``), around whatever
  its function raised, possibly a ``WorkerGroupError`` in turn.

:func:`project_error` walks all of these (and ``__cause__``/``__context__``) to the first
:class:`ProjectError` that is not such a wrapper. What crosses from a worker is the exception the
worker raised, pickled: its own ``__cause__`` chain stays behind (only in the remote traceback
text), so a worker must raise the project error itself, not a plain exception ``from`` it. Ray is
never imported here: if it is not imported yet, nothing can be wrapped by it.
"""
from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator

from modalities.errors import ProjectError

__all__ = ["ProjectError", "is_ray_wrapper", "project_error", "wrapped"]

_WRAPPER_ATTRS = ("cause", "_base_exc", "controller_failure", "health_check_failure")


def is_ray_wrapper(e: BaseException) -> bool:
    """Whether ``e`` is one of Ray's exceptions (a task error, a Ray Train or Tune error): its
    message describes the failure around the cause, not the cause."""
    if type(e).__module__.startswith("ray."):
        return True
    rx = sys.modules.get("ray.exceptions")
    return rx is not None and isinstance(e, rx.RayError)


def wrapped(e: BaseException) -> Iterator[BaseException]:
    """The exceptions ``e`` directly wraps, most specific first: Ray's ``cause`` (a task error),
    Ray Train's ``worker_failures`` (by rank), ``controller_failure``, ``_base_exc`` and
    ``health_check_failure``, an exception group's members, then ``__cause__`` and ``__context__``."""
    for attr in _WRAPPER_ATTRS:
        inner = e.__dict__.get(attr) if hasattr(e, "__dict__") else None  # not getattr: the dual class forwards it
        if isinstance(inner, BaseException):
            yield inner
    failures = e.__dict__.get("worker_failures") if hasattr(e, "__dict__") else None
    if isinstance(failures, dict):
        for _rank, inner in sorted(failures.items(), key=lambda kv: str(kv[0])):
            if isinstance(inner, BaseException):
                yield inner
    for inner in getattr(e, "exceptions", None) or ():  # an ExceptionGroup
        if isinstance(inner, BaseException):
            yield inner
    for inner in (e.__cause__, e.__context__):
        if inner is not None:
            yield inner


def project_error(e: BaseException | None) -> ProjectError | None:
    """The first project error in ``e`` or anything it wraps (breadth first: the error nearest
    the surface wins), or None when there is none (a bug, or a failure of Ray itself)."""
    if e is None:
        return None
    seen: set[int] = set()
    todo: deque[BaseException] = deque([e])
    while todo:
        cur = todo.popleft()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ProjectError) and not is_ray_wrapper(cur):
            return cur
        todo.extend(wrapped(cur))
    return None
