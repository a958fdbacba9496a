"""``djprobe trace --perfetto FILE``: the events as a Perfetto trace (https://ui.perfetto.dev).

Written with the ``perfetto`` package's streaming trace builder (the ``perfetto`` extra): one
track per thread; a call whose function has both an entry and a return probe is one slice, from
the entry event (its arguments as debug annotations) to the return event (``retval``); other
events are instants. Slices nest per thread as calls do; a return with no entry seen on its
thread (the probe went in during the call) is an instant, and a return that skips slices still
open above its own (``longjmp``, an exception) ends them at the same time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO

from ..fetched import FetchedString, FetchError
from ..sites import RETURN_SUFFIX

if TYPE_CHECKING:
    from ..events import EventBatch
    from ..probes import Djprobe

_SEQUENCE = 7  # trusted_packet_sequence_id of every packet (one writer)
_TRACK_BASE = 0x6A70000000000000  # track uuids: this + tid


def missing_package_message() -> str | None:
    """Why --perfetto cannot work here, or None."""
    try:
        import perfetto.trace_builder.proto_builder  # noqa: F401
    except ImportError as exc:
        return f"--perfetto needs the 'perfetto' package (pip install 'djprobe[perfetto]'): {exc}"
    return None


def _function(djp: "Djprobe") -> str:
    site = djp.site or ""
    return site[: -len(RETURN_SUFFIX)] if site.endswith(RETURN_SUFFIX) else site


class PerfettoWriter:
    """Streams trace packets to ``file`` as batches of events come."""

    def __init__(self, file: BinaryIO, pid: int, probes: list["Djprobe"]) -> None:
        from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder

        self._builder = StreamingTraceProtoBuilder(file)
        self._pid = pid
        self._tracks: set[int] = set()
        self._open: dict[int, list[str]] = {}  # tid -> functions of the open slices, innermost last
        self._paired = {_function(d) for d in probes if d.at == "return"} & {
            _function(d) for d in probes if d.at == "entry"
        }
        self.slices = 0
        self.instants = 0
        packet = self._builder.create_packet()
        packet.trusted_packet_sequence_id = _SEQUENCE
        packet.sequence_flags = 1  # SEQ_INCREMENTAL_STATE_CLEARED
        packet.track_descriptor.uuid = _TRACK_BASE
        packet.track_descriptor.process.pid = pid
        packet.track_descriptor.process.process_name = f"djprobe target {pid}"
        self._builder.write_packet(packet)

    def _track(self, tid: int) -> int:
        uuid = _TRACK_BASE + tid
        if tid not in self._tracks:
            self._tracks.add(tid)
            packet = self._builder.create_packet()
            packet.trusted_packet_sequence_id = _SEQUENCE
            packet.track_descriptor.uuid = uuid
            packet.track_descriptor.parent_uuid = _TRACK_BASE
            packet.track_descriptor.thread.pid = self._pid
            packet.track_descriptor.thread.tid = tid
            packet.track_descriptor.thread.thread_name = f"thread {tid}"
            self._builder.write_packet(packet)
        return uuid

    def _event(self, tid: int, time_ns: int, kind: int, name: str | None, annotations: dict[str, Any]) -> None:
        packet = self._builder.create_packet()
        packet.trusted_packet_sequence_id = _SEQUENCE
        packet.timestamp = time_ns
        event = packet.track_event
        event.type = kind
        event.track_uuid = self._track(tid)
        if name is not None:
            event.name = name
        for key, value in annotations.items():
            _annotate(event.debug_annotations.add(), key, value)
        self._builder.write_packet(packet)

    def add(self, batch: "EventBatch", arguments) -> None:
        """Write the events of ``batch``; ``arguments(batch, k)`` gives an event's annotations."""
        from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent

        begin, end, instant = TrackEvent.TYPE_SLICE_BEGIN, TrackEvent.TYPE_SLICE_END, TrackEvent.TYPE_INSTANT
        ev = batch.events
        for k, (tid, t) in enumerate(zip(ev["tid"].tolist(), ev["time_ns"].tolist())):
            probes = batch.probes(k)
            name = _function(probes[0]) if probes else batch.site(k)
            short = name.rpartition(":")[2] or name
            stack = self._open.setdefault(tid, [])
            annotations = arguments(batch, k)
            if batch.is_return(k):
                if name in stack:
                    while stack:
                        top = stack.pop()
                        self._event(tid, t, end, None, annotations if top == name else {})
                        if top == name:
                            break
                    self.slices += 1
                else:
                    self._event(tid, t, instant, short + " (return)", annotations)
                    self.instants += 1
            elif name in self._paired:
                stack.append(name)
                self._event(tid, t, begin, short, annotations)
            else:
                self._event(tid, t, instant, short, annotations)
                self.instants += 1


def _annotate(annotation, key: str, value: Any) -> None:
    annotation.name = key
    if isinstance(value, FetchedString):
        annotation.string_value = str(value) + ("..." if value.truncated else "")
    elif isinstance(value, FetchError):
        annotation.string_value = str(value)
    elif isinstance(value, bool):
        annotation.bool_value = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            annotation.int_value = value
        else:
            annotation.uint_value = value
    elif value is None:
        annotation.string_value = "?"
    else:
        annotation.string_value = str(value)
