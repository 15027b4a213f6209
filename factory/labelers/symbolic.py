"""Symbolic answers judged by Hugging Face's math-verify, under a timeout that works from any thread.

math-verify times its `parse` and `verify` with `signal.alarm`, which works only
in the main thread of the main interpreter (Math-Verify issues #50, #55), and
no signal stops C code that never returns to the interpreter. So:

- `Verifier(workers=N)` (N >= 1, the default) keeps N child processes, fresh
  interpreters started on first use (so a numbers-only run never starts one;
  not multiprocessing's spawn, which would re-run a caller's unguarded main
  script). Each runs math-verify
  in its own main thread, every op under our own alarm (`setitimer`,
  `timeout_s`; math-verify's own whole-second alarms are off, since a nested
  `signal.alarm` would cancel ours), and answers `TIMEOUT` when it rings. The
  parent sends one op at a time to each child and gives it `timeout_s` plus
  `grace_s`: a child that overruns that (stuck in C) or dies is killed and
  replaced, and its op is a `TIMEOUT`. One bad input costs only itself.
- `Verifier(workers=0)` runs the ops in this process under the same alarm when
  called from the main thread (no process start, but no protection from C
  code); from any other thread it uses one child.

An op is `("rational", text)`: the `normalize_number` text when math-verify
reads the answer as a rational number, else None; or `("equivalent", gold,
predicted)`: True or False. Results are memoised per op, so an answer judged
twice is judged the same. Answers are parsed as ``$text$``; plain numbers
(`factory.answers.number_value`) become exact rationals first, and two
rationals compare with `factory.answers`' 1e-6 relative tolerance, so a number
is judged alike on every path. Identical texts are equivalent without parsing.

What math-verify 0.9 does with the edge cases (checked by tests/test_math_answers.py):
``\\text{(C)}`` equals ``C``, ``(C)`` and ``\\text{C}``; ``(3,4]`` differs from
``(3,4)``; ``x=5`` equals ``5`` either way round, ``y = 2x + 3`` equals
``2x+3``; ``\\{1,2\\}`` equals ``\\{2,1\\}``; matrices compare entry by entry;
``(1,2)`` is read as an open interval. It reads ``52_8`` as 52, dropping the
base, so base numerals (``52_8``, ``4210_{5}``) are compared here instead: equal
only to a numeral with the same base and value (``42`` and ``52`` do not match
``52_8``). It reads ``0.\\overline{3}`` as 0, so a repeating decimal is judged wrong.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from pathlib import Path

from factory.answers import RELATIVE_TOLERANCE, normalize_number, number_value
from factory.arrow import threads

__all__ = ["TIMEOUT", "Verifier", "default_verifier", "judge"]

TIMEOUT = "timeout"  # an op's result when it ran out of time
START_TIMEOUT_S = 120.0  # a child imports sympy before its first op
MEMO_SIZE = 200_000
_BASE_NUMERAL = re.compile(r"([0-9A-Za-z]*[0-9][0-9A-Za-z]*)_(?:\{\(?(\d+)\)?\}|(\d))")


class _Timeout(BaseException):
    """Our alarm rang: a BaseException, so math-verify's `except Exception` does not swallow it."""


def _base_numeral(text: str) -> tuple[int, int] | None:
    """(value, base) of a numeral with a base subscript other than 10 (``52_8``), else None."""
    match = _BASE_NUMERAL.fullmatch("".join(text.split()))
    if match is None:
        return None
    base = int(match[2] or match[3])
    try:
        return (int(match[1], base), base) if 2 <= base <= 36 and base != 10 else None
    except ValueError:  # a digit the base does not have
        return None


class _Ops:
    """The ops, run where signals work (a child's main thread, or the caller's); parses are cached."""

    def __init__(self):
        import math_verify
        import sympy

        # It warns once that its own timeouts are off: ours are on.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        self.math_verify, self.sympy = math_verify, sympy
        self.parsed: OrderedDict[str, list | None] = OrderedDict()  # None: timed out

    def parse(self, text: str) -> list:
        """math-verify's readings of an answer; a text whose parse ran out of time once does so again at once."""
        if text in self.parsed:
            self.parsed.move_to_end(text)
            if self.parsed[text] is None:
                raise _Timeout
            return self.parsed[text]
        value = number_value(text)
        if value is not None:
            parsed = [self.sympy.Rational(value.numerator, value.denominator)]
        else:
            latex = " ".join(text.split())
            try:
                parsed = self.math_verify.parse(f"${latex}$", parsing_timeout=None) or [latex]
            except _Timeout:
                self.parsed[text] = None
                raise
        self.parsed[text] = parsed
        if len(self.parsed) > MEMO_SIZE:
            self.parsed.popitem(last=False)
        return parsed

    def _rational(self, text: str) -> Fraction | None:
        first = self.parse(text)[0]
        if isinstance(first, self.sympy.Basic) and first.is_number and first.is_rational:
            first = first.doit()  # 2^{10}, \sqrt{4}, \sin(\pi/6) are kept unevaluated
        return Fraction(int(first.p), int(first.q)) if isinstance(first, self.sympy.Rational) else None

    def rational(self, text: str) -> str | None:
        if _base_numeral(text) is not None:
            return None
        value = self._rational(text)
        return None if value is None else normalize_number(value)

    def equivalent(self, gold: str, predicted: str) -> bool:
        if gold.strip() == predicted.strip():
            return True
        bases = _base_numeral(gold), _base_numeral(predicted)
        if bases != (None, None):
            return bases[0] == bases[1]
        g, p = self._rational(gold), self._rational(predicted)
        if g is not None and p is not None:
            return g == p or abs(p - g) <= RELATIVE_TOLERANCE * max(abs(p), abs(g))
        verify = self.math_verify.verify
        return any(verify(a, b, timeout_seconds=None) for a in self.parse(gold) for b in self.parse(predicted))


def _run(ops: _Ops, op: tuple, timeout_s: float):
    """One op under a SIGALRM of our own; TIMEOUT when it rings. Main thread only."""

    def ring(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return getattr(ops, op[0])(*op[1:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return TIMEOUT
    finally:
        signal.signal(signal.SIGALRM, previous)


def _serve(fd: int, timeout_s: float) -> None:
    """A child's loop: ops in, results out, until told to stop (None) or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    connection = Connection(fd)
    ops = _Ops()
    connection.send("ready")
    while True:
        try:
            op = connection.recv()
        except EOFError:
            return
        if op is None:
            return
        connection.send(_run(ops, op, timeout_s))


_CHILD_CODE = "import sys; from factory.labelers.symbolic import _serve; _serve(int(sys.argv[1]), float(sys.argv[2]))"


class _Child:
    """A worker: a fresh interpreter running `_serve`, talking over a socket pair."""

    def __init__(self, timeout_s: float):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the factory package
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(theirs.fileno()), repr(timeout_s)],
                                        pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL)
        theirs.close()
        self.connection = Connection(ours.detach())

    def wait_ready(self) -> None:
        try:
            ready = self.connection.poll(START_TIMEOUT_S) and self.connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"the math-verify worker did not start within {START_TIMEOUT_S:.0f} s "
                               "(is math-verify installed?)")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.connection.close()

    def stop(self) -> None:
        try:
            self.connection.send(None)
            self.process.wait(5)
            self.connection.close()
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


class Verifier:
    """Runs math-verify ops with a timeout of its own (see the module docstring); safe to share between threads."""

    def __init__(self, *, workers: int | None = None, timeout_s: float = 5.0, grace_s: float | None = None):
        self.workers = min(threads(), 4) if workers is None else workers
        self.timeout_s = timeout_s
        self.grace_s = max(2.0, timeout_s) if grace_s is None else grace_s
        self._children: list[_Child] = []
        self._inline: _Ops | None = None
        self._memo: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        weakref.finalize(self, _stop, self._children)

    def equivalent(self, pairs: list[tuple[str, str]]) -> list:
        """For each (gold, predicted): True, False or TIMEOUT."""
        return self.run([("equivalent", gold, predicted) for gold, predicted in pairs])

    def rational(self, texts: list[str]) -> list:
        """For each answer: its `normalize_number` text if it is a rational number, else None; or TIMEOUT."""
        return self.run([("rational", text) for text in texts])

    def run(self, ops: list[tuple]) -> list:
        with self._lock:
            todo = list(dict.fromkeys(op for op in ops if op not in self._memo))
            if todo:
                if self.workers == 0 and threading.current_thread() is threading.main_thread():
                    if self._inline is None:
                        self._inline = _Ops()
                    results = [_run(self._inline, op, self.timeout_s) for op in todo]
                else:
                    results = self._in_children(todo)
                for op, result in zip(todo, results):
                    self._memo[op] = result
            for op in ops:
                self._memo.move_to_end(op)
            results = [self._memo[op] for op in ops]
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
            return results

    def _start(self, count: int) -> None:
        new = [_Child(self.timeout_s) for _ in range(count)]
        for child in new:
            child.wait_ready()
        self._children += new

    def _in_children(self, ops: list[tuple]) -> list:
        self._start(max(1, min(self.workers, len(ops))) - len(self._children))
        results: list = [None] * len(ops)
        queue = deque(range(len(ops)))
        busy: dict[int, tuple[int, float]] = {}  # child index -> (op index, deadline)
        while queue or busy:
            for index in range(len(self._children)):
                if queue and index not in busy:
                    op = queue.popleft()
                    try:
                        self._children[index].connection.send(ops[op])
                    except OSError:  # it died between ops: a new one takes the op
                        queue.appendleft(op)
                        self._replace(index)
                        continue
                    busy[index] = (op, time.monotonic() + self.timeout_s + self.grace_s)
            if not busy:
                continue
            now = time.monotonic()
            ready = wait([self._children[i].connection for i in busy],
                         timeout=max(0.0, min(deadline for _, deadline in busy.values()) - now))
            now = time.monotonic()
            for index, (op, deadline) in list(busy.items()):
                child = self._children[index]
                if child.connection in ready:
                    try:
                        results[op] = child.connection.recv()
                        del busy[index]
                        continue
                    except (EOFError, OSError):  # it died (out of memory, say)
                        pass
                elif now < deadline:
                    continue
                results[op] = TIMEOUT
                del busy[index]
                self._replace(index)
        return results

    def _replace(self, index: int) -> None:
        self._children[index].kill()
        self._children[index] = _Child(self.timeout_s)
        self._children[index].wait_ready()

    def pids(self) -> list[int]:
        """The child processes' ids (for tests and for seeing what runs)."""
        return [child.process.pid for child in self._children]

    def close(self) -> None:
        """Stop the children (a later op starts new ones)."""
        with self._lock:
            _stop(self._children)


def _stop(children: list[_Child]) -> None:
    for child in children:
        child.stop()
    children.clear()


_DEFAULT: Verifier | None = None
_DEFAULT_LOCK = threading.Lock()


def default_verifier() -> Verifier:
    """The process-wide verifier (children started on first use, stopped at exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Verifier()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def judge(pairs: list[tuple[str, str]], verifier: Verifier | None = None) -> list[str]:
    """'correct', 'wrong' or 'timeout' for each (gold, predicted) pair of answer texts."""
    results = (verifier or default_verifier()).equivalent(pairs)
    return [TIMEOUT if result == TIMEOUT else "correct" if result else "wrong" for result in results]
