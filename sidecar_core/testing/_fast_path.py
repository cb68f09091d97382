"""Which frames a transport sent on the loop, for tests of its ``send_nowait`` fast path."""

from __future__ import annotations

import pytest

from sidecar_core._frame import Frame
from sidecar_core._transport import Transport


def ids_sent_on_the_loop(monkeypatch: pytest.MonkeyPatch, transport: type[Transport]) -> list[str]:
    """Record the ids of the frames that ``transport`` sends on the loop rather than with ``send_nowait``.

    From now on, until ``monkeypatch`` undoes it, every frame that goes through the coroutine
    :meth:`~sidecar_core.Transport.send` of ``transport`` adds its id to the returned list.
    """
    ids: list[str] = []
    original = transport.send

    async def counted(self: Transport, dst: int, frame: Frame) -> None:
        ids.append(frame.header.id)
        await original(self, dst, frame)

    monkeypatch.setattr(transport, "send", counted)
    return ids
