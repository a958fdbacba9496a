"""Frida rows: an `Interceptor` on a function of the loop target, attached while the target
waits at its gate, the loop run, the script's own figures read back over RPC.

- *Frida Interceptor + CModule* (`frida`): `onEnter` in C, a `lock inc` of a counter.
- *Frida onEnter + readUtf8String* (`frida_string`, on `work_str`): JavaScript reading the
  string argument at every call.
- *Frida onEnter/onLeave latency* (`frida_latency`): `onEnter`/`onLeave` in C (a CModule), the
  TSC at the entry kept in the invocation's data, the elapsed ticks added into a log2 histogram
  at the exit (what `djprobe latency` does in its stubs, here through Frida's trampolines).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from . import build
from .loop import Sample, Skip, _Out, _loop_argv, _parse_result, _sample

COUNT_SCRIPT = """
const hits = Memory.alloc(64);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile gint64 hits;
void onEnter (GumInvocationContext * ic)
{
  volatile gint64 * p = &hits;
  asm volatile ("lock incq (%0)" : : "r" (p) : "memory");
}
`, { hits });
Interceptor.attach(ptr("ADDRESS"), cm);
rpc.exports = { figures() { return [hits.readS64().toString()]; } };
"""
# (The counter lives in memory allocated by the script: a CModule's own globals sit next to its
# code, which is not writable on this system; TinyCC's "m" operand on an extern misassembles.)

STRING_SCRIPT = """
let n = 0, bad = 0;
Interceptor.attach(ptr("ADDRESS"), {
  onEnter(args) { const s = args[0].readUtf8String(); if (s !== "EXPECTED") bad++; n++; }
});
rpc.exports = { figures() { return [n, bad]; } };
"""

LATENCY_SCRIPT = """
const calls = Memory.alloc(8);
const hist = Memory.alloc(64 * 8);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile guint64 calls;
extern volatile guint64 hist[64];
typedef struct { guint64 start; } Call;
static guint64 tsc (void)
{
  guint32 lo, hi;
  asm volatile ("rdtsc" : "=a" (lo), "=d" (hi));
  return ((guint64) hi << 32) | lo;
}
void onEnter (GumInvocationContext * ic)
{
  Call * c = GUM_IC_GET_INVOCATION_DATA (ic, Call);
  volatile guint64 * p = &calls;
  asm volatile ("lock incq (%0)" : : "r" (p) : "memory");
  c->start = tsc ();
}
void onLeave (GumInvocationContext * ic)
{
  Call * c = GUM_IC_GET_INVOCATION_DATA (ic, Call);
  guint64 d = tsc () - c->start;
  int b = 0;
  while (d > 1 && b < 63) { d >>= 1; b++; }
  volatile guint64 * p = &hist[b];
  asm volatile ("lock incq (%0)" : : "r" (p) : "memory");
}
`, { calls, hist });
Interceptor.attach(ptr("ADDRESS"), cm);
rpc.exports = {
  figures() {
    let returns = 0n;
    for (let i = 0; i < 64; i++) returns += BigInt(hist.add(8 * i).readU64().toString());
    return [calls.readU64().toString(), returns.toString()];
  }
};
"""


def _frida():
    try:
        import frida
    except ImportError:
        raise Skip("frida not installed (pip install frida)") from None
    return frida


def attach_and_run(func: str, mode: str, threads: int, iters: int, script_text: str) -> tuple[dict[str, int], list[Any]]:
    """Start the loop target (``mode``) at its gate, attach Frida with ``script_text`` (ADDRESS
    replaced by ``func``'s address), run the loop, and return the loop's result and the script's
    ``figures()``."""
    frida = _frida()
    exe = build.loop_target()
    vaddr, _ = build.symbol(exe, func)
    with _Out() as out:
        p = subprocess.Popen(_loop_argv(mode, iters, threads, out, "gate"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
        session = None
        try:
            if not p.stdout.readline().startswith("ready"):
                raise RuntimeError("target did not start")
            with open(f"/proc/{p.pid}/maps") as maps:
                base = int(maps.readline().split("-")[0], 16)
            session = frida.attach(p.pid)
            errors: list = []
            script = session.create_script(script_text.replace("ADDRESS", hex(base + vaddr)))
            script.on("message", lambda m, d: errors.append(m) if m.get("type") == "error" else None)
            script.load()
            if errors:
                raise RuntimeError(f"frida script: {errors[0].get('description')}")
            p.stdin.write("go\n")
            p.stdin.flush()
            while p.poll() is None and not out.read_text():
                time.sleep(0.01)
            figures = list(script.exports_sync.figures())
            script.unload()
            p.stdin.write("exit\n")
            p.stdin.flush()
            p.wait(timeout=60)
            return _parse_result(out.read_text()), figures
        finally:
            if session is not None:
                try:
                    session.detach()
                except Exception:  # noqa: BLE001 - the process may be gone
                    pass
            if p.poll() is None:
                p.kill()
                p.wait()


def run_frida(threads: int, iters: int) -> Sample:
    r, (hits,) = attach_and_run("work", "work", threads, iters, COUNT_SCRIPT)
    return _sample(r, iters, int(hits))


def run_frida_string(threads: int, iters: int) -> Sample:
    from .string_rows import BENCH_STRING

    r, (hits, bad) = attach_and_run("work_str", "str", threads, iters, STRING_SCRIPT.replace("EXPECTED", BENCH_STRING))
    s = _sample(r, iters, int(hits), wrong_strings=int(bad))
    if bad:
        s.expected_hits = -1
    return s


def run_frida_latency(threads: int, iters: int) -> Sample:
    r, (calls, returns) = attach_and_run("work", "work", threads, iters, LATENCY_SCRIPT)
    s = _sample(r, iters, int(calls), returns=int(returns))
    if int(returns) != int(calls):
        s.expected_hits = -1  # an exit not measured: WRONG
    return s
