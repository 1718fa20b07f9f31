"""``get_unique_name_for_message``: the name messages are routed by (docs/guarantees.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipcbus import DeadLetter, Message, get_unique_name_for_message

from .messages import OrderPlaced, PriorityOrderPlaced, Tick


class Outer:
    @dataclass(frozen=True)
    class Inner(Message):
        value: int

        @dataclass(frozen=True)
        class Deepest(Message):
            pass


def test_the_name_of_a_type_is_module_dot_qualname() -> None:
    assert get_unique_name_for_message(OrderPlaced) == "tests.messages.OrderPlaced"
    assert get_unique_name_for_message(Tick) == "tests.messages.Tick"
    assert get_unique_name_for_message(DeadLetter) == "ipcbus.message.DeadLetter"


def test_an_instance_has_the_name_of_its_type() -> None:
    assert get_unique_name_for_message(OrderPlaced(1)) == "tests.messages.OrderPlaced"
    assert get_unique_name_for_message(Tick(3, "x")) == get_unique_name_for_message(Tick)


def test_a_subclass_has_its_own_name() -> None:
    assert get_unique_name_for_message(PriorityOrderPlaced(1)) == (
        "tests.messages.PriorityOrderPlaced"
    )
    assert get_unique_name_for_message(PriorityOrderPlaced) != get_unique_name_for_message(
        OrderPlaced
    )


def test_nested_classes_use_their_qualname() -> None:
    assert get_unique_name_for_message(Outer.Inner) == f"{__name__}.Outer.Inner"
    assert get_unique_name_for_message(Outer.Inner(1)) == f"{__name__}.Outer.Inner"
    assert get_unique_name_for_message(Outer.Inner.Deepest) == (f"{__name__}.Outer.Inner.Deepest")


def test_a_local_class_uses_its_qualname() -> None:
    @dataclass(frozen=True)
    class Local(Message):
        pass

    name = get_unique_name_for_message(Local)
    assert name == (f"{__name__}.test_a_local_class_uses_its_qualname.<locals>.Local")
    assert get_unique_name_for_message(Local()) == name


def test_a_class_from_mp_main_is_named_after_main() -> None:
    @dataclass(frozen=True)
    class Job(Message):
        job_id: int

    Job.__module__ = "__mp_main__"
    Job.__qualname__ = "Job"
    assert get_unique_name_for_message(Job) == "__main__.Job"
    assert get_unique_name_for_message(Job(1)) == "__main__.Job"


def test_a_class_from_main_is_named_after_main() -> None:
    @dataclass(frozen=True)
    class Job(Message):
        job_id: int

    Job.__module__ = "__main__"
    Job.__qualname__ = "Scope.Job"
    assert get_unique_name_for_message(Job) == "__main__.Scope.Job"


@pytest.mark.parametrize("module", ["__mp_main__x", "my__mp_main__", "tests.__main__"])
def test_only_the_exact_mp_main_module_is_renamed(module: str) -> None:
    @dataclass(frozen=True)
    class Job(Message):
        pass

    Job.__module__ = module
    Job.__qualname__ = "Job"
    assert get_unique_name_for_message(Job) == f"{module}.Job"


# -- across processes -------------------------------------------------------------------------

_SCRIPT = """
    import json
    import multiprocessing
    import sys
    from dataclasses import dataclass

    from ipcbus import Message, get_unique_name_for_message


    @dataclass(frozen=True)
    class ScriptPing(Message):
        seq: int


    def child(connection):
        try:
            connection.send(
                {
                    "module": ScriptPing.__module__,
                    "type_name": get_unique_name_for_message(ScriptPing),
                    "instance_name": get_unique_name_for_message(ScriptPing(1)),
                }
            )
        finally:
            connection.close()


    if __name__ == "__main__":
        report = {
            "parent": {
                "module": ScriptPing.__module__,
                "type_name": get_unique_name_for_message(ScriptPing),
                "instance_name": get_unique_name_for_message(ScriptPing(1)),
            }
        }
        for method in ("spawn", "forkserver"):
            context = multiprocessing.get_context(method)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=child, args=(sender,))
            process.start()
            sender.close()
            if not receiver.poll(45):
                process.kill()
                process.join(5)
                sys.exit(f"no answer from the {method} child")
            report[method] = receiver.recv()
            process.join(15)
            report[method]["exitcode"] = process.exitcode
        print(json.dumps(report))
"""


@pytest.mark.forks
def test_a_main_script_class_has_the_same_name_in_spawn_and_forkserver_children(
    tmp_path: Path,
) -> None:
    script = tmp_path / "name_script.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"parent", "spawn", "forkserver"}
    assert report["parent"]["module"] == "__main__"
    for method in ("spawn", "forkserver"):
        # The premise of the test: the child sees the script's class under another module name.
        assert report[method]["module"] == "__mp_main__", method
        assert report[method]["exitcode"] == 0, method
    for side in ("parent", "spawn", "forkserver"):
        assert report[side]["type_name"] == "__main__.ScriptPing", side
        assert report[side]["instance_name"] == "__main__.ScriptPing", side
