"""The command line against a daemon that is not there: canned answers, and what it was asked."""

from __future__ import annotations

from typing import Any

from marsfs import cli
from marsfs.faces.commands import COMMANDS, Request, run


class FakeDaemon:
    """What a daemon would answer, and what it was asked."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        self.asked.append((cmd, args))
        answer = self.answers[cmd]
        if isinstance(answer, Exception):
            raise answer
        return answer


def cli_run(argv: list[str], daemon: Request) -> int:
    """Run the command line ``argv`` against ``daemon`` (a :class:`FakeDaemon` or any fake that
    answers requests); its exit status."""
    args = cli.build_parser().parse_args(argv)
    return run(COMMANDS[args.command], args, daemon)
