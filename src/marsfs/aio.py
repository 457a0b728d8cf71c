"""trio helpers shared by the layers that run on trio."""

from __future__ import annotations

import trio


class single_error:
    """``async with trio.open_nursery()`` inside ``with single_error():`` raises the first real
    error of a task instead of an ExceptionGroup, so callers can catch ConnectionLost & co."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, BaseExceptionGroup):
            leaves = _leaves(exc)
            real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
            raise (real or leaves)[0]
        return False


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
