"""Registering task functions: names, models, parameters and options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import pytest

from lilota.errors import RegistrationError, TaskAlreadyRegistered, TaskNotRegistered
from lilota.models import TaskProgress
from lilota.registry import MAX_RETRY_DELAY, Registry, RetryPolicy


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


@pytest.fixture
def registry() -> Registry:
    return Registry()


def test_decorator_registers_and_returns_the_function(registry: Registry) -> None:
    @registry.register("add", input_model=AddInput, output_model=AddOutput)
    def add(data: AddInput) -> AddOutput:
        return AddOutput(sum=data.a + data.b)

    definition = registry.get("add")
    assert definition.func is add
    assert definition.input_model is AddInput
    assert definition.output_model is AddOutput
    assert definition.input_param == "data"
    assert definition.progress_param is None
    assert add(AddInput(1, 2)) == AddOutput(3)
    assert registry.names == {"add"}
    assert "add" in registry and len(registry) == 1


def test_function_without_parameters_takes_no_input(registry: Registry) -> None:
    registry.register("hello-world", lambda: None)
    assert registry.get("hello-world").input_param is None


def test_same_name_twice_is_refused(registry: Registry) -> None:
    registry.register("add", lambda data: data)
    with pytest.raises(TaskAlreadyRegistered, match="'add' is already registered"):
        registry.register("add", lambda data: data)


def test_unknown_name_lists_the_registered_ones(registry: Registry) -> None:
    registry.register("b", lambda: None)
    registry.register("a", lambda: None)
    with pytest.raises(
        TaskNotRegistered, match=r"no task named 'c' is registered \(registered: a, b\)"
    ):
        registry.get("c")
    assert registry.find("c") is None


@pytest.mark.parametrize("name", ["", "has space", "x" * 201, None, 5])
def test_bad_names_are_refused(registry: Registry, name: object) -> None:
    with pytest.raises(RegistrationError, match="task name must be"):
        registry.register(name, lambda: None)  # type: ignore[arg-type]


def test_progress_parameter_found_by_annotation(registry: Registry) -> None:
    @registry.register("p", input_model=AddInput, task_progress=TaskProgress)
    def work(data: AddInput, tracker: TaskProgress) -> None: ...

    definition = registry.get("p")
    assert (definition.input_param, definition.progress_param) == ("data", "tracker")


def test_progress_parameter_found_by_name(registry: Registry) -> None:
    @registry.register("p", task_progress=TaskProgress)
    def do_something(task_progress) -> None: ...  # type: ignore[no-untyped-def]

    definition = registry.get("p")
    assert (definition.input_param, definition.progress_param) == (None, "task_progress")


def test_progress_goes_to_last_parameter_when_unnamed(registry: Registry) -> None:
    @registry.register("p", input_model=AddInput, task_progress=TaskProgress)
    def work(data, tracker) -> None: ...  # type: ignore[no-untyped-def]

    assert registry.get("p").progress_param == "tracker"
    assert registry.get("p").input_param == "data"


def test_input_model_needs_a_parameter(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="takes no parameter to receive the input"):
        registry.register("x", lambda: None, input_model=AddInput)


def test_two_required_inputs_are_refused(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="has 2 required parameters"):
        registry.register("x", lambda a, b: None)


def test_task_progress_must_be_the_class(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="task_progress must be TaskProgress"):
        registry.register("x", lambda p: None, task_progress=int)


def test_unsupported_model_is_refused(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="input_model"):
        registry.register("x", lambda d: None, input_model=int)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be an int from 1 to 2147483647, got 0"),
        ({"max_attempts": True}, "max_attempts must be an int from 1 to 2147483647, got True"),
        ({"max_attempts": 2**31}, "max_attempts must be an int from 1 to 2147483647, got 2147"),
        ({"retry_delay": -1}, "retry_delay must be positive"),
        ({"timeout": "10s"}, "timeout must be a timedelta or seconds"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"schedule": "every minute"}, "schedule must be every"),
    ],
)
def test_bad_options_are_refused(
    registry: Registry, options: dict[str, object], message: str
) -> None:
    with pytest.raises(RegistrationError, match=message):
        registry.register("x", lambda: None, **options)  # type: ignore[arg-type]
    assert "x" not in registry


def test_options_are_kept(registry: Registry) -> None:
    registry.register(
        "x", lambda: None, max_attempts=4, retry_delay=2, timeout=timedelta(minutes=1)
    )
    definition = registry.get("x")
    assert definition.retry == RetryPolicy(max_attempts=4, retry_delay=timedelta(seconds=2))
    assert definition.timeout == timedelta(minutes=1)


def test_retry_delay_doubles_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=30, retry_delay=timedelta(seconds=2))
    assert policy.delay_after(1, rand=lambda: 0.0) == timedelta(seconds=2)
    assert policy.delay_after(3, rand=lambda: 0.0) == timedelta(seconds=8)
    assert policy.delay_after(3, rand=lambda: 1.0) == timedelta(seconds=6)  # 25 % jitter
    assert policy.delay_after(25, rand=lambda: 0.0) == MAX_RETRY_DELAY


def test_async_function_is_marked_async(registry: Registry) -> None:
    async def fetch() -> None: ...

    registry.register("fetch", fetch)
    assert registry.get("fetch").is_async


def test_a_parametrised_dict_or_mapping_model_registers_as_a_dict(registry: Registry) -> None:
    # The earlier release took these; refusing them took a whole worker script down.
    @registry.register("scores", input_model=dict[str, int], output_model=Mapping[str, int])
    def scores(data: dict[str, int]) -> dict[str, int]:
        return data

    assert registry.get("scores").input_model == dict[str, int]
